"""A run's outputs: JSON-safe values, an output folder written all at once (nothing half-written is left), the
model's latent and clusters stored into AnnData.  Used by the ``pyro-vmm`` commands; no argument parsing here."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["environment", "json_safe", "last_value", "on_model_genes", "publish", "staged", "store_embedding"]


def json_safe(value: Any) -> Any:
    """Floats NaN/inf -> None, numpy scalars -> Python, recursively (strict JSON)."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def last_value(history: dict, key: str) -> float | None:
    frame = history.get(key)
    if frame is None or len(frame) == 0:
        return None
    return float(frame.iloc[-1, 0])


def publish(staging: Path, out: Path, outputs: tuple[str, ...]) -> None:
    """Move every finished output from ``staging`` into ``out`` (replacing old ones); an output of an earlier run
    that this run does not write (``mde.png`` under ``--no-mde``, say) is removed, so ``out`` holds one run."""
    stale = [out / name for name in outputs if not (staging / name).exists() and (out / name).exists()]
    for name in outputs:
        src = staging / name
        if not src.exists():
            continue
        dst = out / name
        if dst.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=out))
            os.replace(dst, old / name)
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


@contextlib.contextmanager
def staged(out: Path, outputs: tuple[str, ...]) -> Iterator[Path]:
    """A staging folder inside ``out`` to write outputs into; on success they are published together
    (:func:`publish`), and the staging folder is removed either way, so a failed run leaves no partial output."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        yield staging
        publish(staging, out, outputs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def store_embedding(adata, model, on=None):
    """Write the model's latent means (``obsm["X_vmm"]``), cluster probabilities q(c|z) (``obsm["vmm_cluster_probs"]``),
    the final clusters (``obs["vmm_cluster"]``, :meth:`VMMSCVI.get_cluster_assignments`) and the map from components
    to clusters (``uns["vmm_cluster_of_component"]``) of the cells of ``on`` (default: the model's AnnData) into
    ``adata``; returns (latent, probs, assignments)."""
    import numpy as np
    import pandas as pd

    latent = model.get_latent_representation(on)
    probs = model.get_cluster_probabilities(on)
    assign = model.clusters_from_probabilities(probs)  # as get_cluster_assignments, without a second pass
    adata.obsm["X_vmm"] = latent.astype(np.float32)
    adata.obsm["vmm_cluster_probs"] = probs.astype(np.float32)
    cluster_of = getattr(model, "cluster_of_component_", None)
    if cluster_of is not None:
        adata.uns["vmm_cluster_of_component"] = np.asarray(cluster_of, dtype=np.int64)
    adata.obs["vmm_cluster"] = pd.Categorical(assign.astype(str), categories=sorted(set(assign.astype(str)), key=int))
    return latent, probs, assign


def on_model_genes(adata, genes):
    """``adata`` on the model's ``genes`` (so ``VMMSCVI.load(DIR/"model", adata=read_h5ad(DIR/"adata.h5ad"))``
    works as is), with every gene of the input kept in ``.raw`` (scanpy's place for the full gene set)."""
    if list(adata.var_names) == list(genes):
        return adata
    out = adata[:, list(genes)].copy()
    out.raw = adata
    return out


def environment(model) -> dict[str, Any]:
    """Python and torch versions, the model's device and torch's thread count, for ``metrics.json``."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "device": str(model.module.device),
            "torch_threads": torch.get_num_threads()}
