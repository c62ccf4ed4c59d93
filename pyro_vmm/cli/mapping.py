"""``pyro-vmm map``: place the cells of new batches onto a model trained by ``pyro-vmm scrna`` (reference mapping).

    pyro-vmm map --reference runs/kang --data QUERY.h5ad --labels-key cell_type --out runs/query

``--reference`` is the output folder of ``pyro-vmm scrna`` (its ``model/`` and ``adata.h5ad``).  The query file needs
raw counts (``X`` or ``--layer``) for every gene the model uses (matched by name; other genes are kept but not used)
and the model's batch column.  Steps: ``VMMSCVI.load_query_data`` (scArches-style: only the new batches' weights
train; encoder, decoder and the VMM prior stay as they are) -> train on the query cells -> write into ``DIR``.  When
every batch of the query is one the reference was trained on there is nothing to learn: the query cells are embedded
by the reference model as it is (frozen, no training; the command says so, ``metrics.json`` has ``"mode":
"embedded"``, and no ``training.png`` or ``model/`` is written).

- ``adata.h5ad``: the query cells and all their genes with ``obsm["X_vmm"]``, ``obs["vmm_cluster"]`` (the reference's
  clusters) and ``obsm["vmm_cluster_probs"]``; with ``--labels-key`` (a column of the reference) also
  ``obs["predicted_<key>"]`` and ``obs["predicted_<key>_confidence"]``: the majority label of the 15 nearest
  reference cells in the latent space and its share of the votes;
- ``metrics.json``: settings, sizes, the query's batches, clusters used, ELBOs, runtime and, when the query has the
  labels column too, the accuracy and macro F1 of the transferred labels;
- ``mde.png``: one MDE of reference and query cells together, coloured by reference/query, label and VMM cluster;
- ``training.png`` (when trained): the query training's −ELBO (train, validation) and utilized clusters per epoch;
- ``model/`` (when trained): the query model (``VMMSCVI.load("DIR/model", adata)`` with the query cells on the
  model's genes).

As with ``scrna``, outputs are staged and moved into place together only when all are complete.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from . import add_command, add_io_args
from ..outputs import environment, json_safe, last_value, staged, store_embedding
from .scrna import add_run_args, check_out

#: files and folders the command writes into --out
OUTPUTS = ("adata.h5ad", "metrics.json", "mde.png", "training.png", "model")
#: reference cells voting for each query cell's label
N_NEIGHBORS = 15


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "map", "map cells of new batches onto a model trained by 'pyro-vmm scrna' (scArches-style)",
        "Reference mapping: train only the new batches' weights of a saved VMM-scVI on the query cells; they get the "
        "latent, the reference's clusters and (with --labels-key) labels transferred from the reference cells.",
        OUTPUTS,
    )
    io = add_io_args(
        p, "query AnnData file with raw counts", "layer of the query file holding the raw counts (default: X)"
    )
    io.add_argument("--reference", required=True, metavar="DIR", help="output folder of 'pyro-vmm scrna'")
    io.add_argument("--labels-key", default=None,
                    help="obs column of the reference with cell types to transfer (scored if the query has it too)")
    io.add_argument("--overwrite", action="store_true", help="replace outputs already in --out")
    t = p.add_argument_group("training")
    t.add_argument("--max-epochs", type=int, default=100, help="epochs over the query cells")
    t.add_argument("--batch-size", type=int, default=128, help="minibatch size")
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate (Adam) of the new batches' weights")
    add_run_args(t)
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("max_epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    ref = Path(args.reference)
    missing = [name for name in ("model", "adata.h5ad") if not (ref / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"--reference {args.reference!r} has no {' or '.join(missing)}; pass the output folder of "
            "'pyro-vmm scrna' (it holds model/ and adata.h5ad)"
        )
    check_out(args.out, OUTPUTS, args.overwrite)


def _model_genes(reference_adata):
    """The genes the reference model reads, in its order: those ``pyro-vmm scrna`` marked ``highly_variable``
    (``VMMSCVI.load`` then checks them against the names saved with the model)."""
    if "highly_variable" not in reference_adata.var:
        raise ValueError(
            "the reference's adata.h5ad has no var['highly_variable'] column; pass the output folder of "
            "'pyro-vmm scrna', which marks the genes its model uses"
        )
    return reference_adata.var_names[reference_adata.var["highly_variable"].to_numpy(dtype=bool)]


def _on_genes(adata, genes, where: str):
    """``adata`` restricted to ``genes`` in that order; a clear error naming the missing genes otherwise."""
    import numpy as np

    from pyro_vmm.validation import InputError

    if not adata.var_names.is_unique:
        dups = adata.var_names[adata.var_names.duplicated()].unique()
        raise InputError(
            f"{where} has {len(dups)} duplicated gene name(s) (first: {', '.join(map(repr, dups[:5].tolist()))}), so "
            "its genes cannot be matched to the model's. Fix: adata.var_names_make_unique(), or sum the duplicates."
        )
    missing = np.asarray(genes)[~np.isin(np.asarray(genes), np.asarray(adata.var_names))]
    if missing.size:
        raise InputError(
            f"{where} lacks {missing.size} of the model's {len(genes)} genes (first: "
            f"{', '.join(map(repr, missing[:5].tolist()))}). Fix: add them as all-zero columns (genes not measured), "
            "with the same gene names (adata.var_names) as the reference data."
        )
    return adata[:, list(genes)].copy()


def run(args: argparse.Namespace) -> int:
    """Run the ``map`` job described by parsed ``args``; returns the exit code (0)."""
    t_start = time.perf_counter()
    _check_args(args)

    import anndata
    import numpy as np
    import pandas as pd

    from pyro_vmm import VMMSCVI
    from pyro_vmm.data.scrna import read_counts
    from pyro_vmm.evaluation import knn_label_transfer, label_transfer_scores
    from pyro_vmm.utils import atomic_path

    log = (lambda *a: None) if args.no_progress else (lambda *a: print("[pyro-vmm map]", *a, file=sys.stderr))
    ref_dir = Path(args.reference)
    reference = anndata.read_h5ad(ref_dir / "adata.h5ad")
    genes = _model_genes(reference)
    ref_model = VMMSCVI.load(str(ref_dir / "model"), adata=_on_genes(reference, genes, "the reference adata.h5ad"))
    batch_key = ref_model.adata_manager.registry["setup_args"].get("batch_key")
    if batch_key is None:
        raise ValueError(
            f"the model in --reference {args.reference!r} was trained without --batch-key, so it has no batch input "
            "to extend to new batches. Fix: run 'pyro-vmm scrna' on the reference with --batch-key COLUMN (the "
            "query file needs the same column)"
        )
    if args.labels_key is not None and args.labels_key not in reference.obs:
        raise KeyError(
            f"--labels-key {args.labels_key!r} is not a column of the reference's adata.obs; available columns: "
            f"{[c for c in map(str, reference.obs.columns) if not c.startswith('_scvi')]}"
        )

    query = read_counts(args.data, layer=args.layer)
    log(f"read {query.n_obs} query cells x {query.n_vars} genes from {args.data}")
    used = _on_genes(query, genes, "the query file")
    empty = np.asarray(used.X.sum(axis=1)).ravel() == 0
    if empty.any():
        warnings.warn(f"{int(empty.sum())} query cells have no counts in the model's {len(genes)} genes and are "
                      "left out", stacklevel=2)
        used, query = used[~empty].copy(), query[~empty].copy()
    from scvi import REGISTRY_KEYS

    ref_batches = [str(b) for b in
                   ref_model.adata_manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping]
    query_batches = sorted(map(str, used.obs[batch_key].astype(str).unique())) if batch_key in used.obs else None
    frozen = query_batches is not None and set(query_batches) <= set(ref_batches)
    t_train = time.perf_counter()
    if frozen:  # nothing new to learn: the reference model embeds these cells as it embeds its own
        print(f"[pyro-vmm map] the reference was trained on every batch of the query ({', '.join(query_batches)}): "
              "embedding the query cells with the reference model as it is (frozen, no training)", file=sys.stderr)
        model, on = ref_model, used
    else:
        model, on = VMMSCVI.load_query_data(used, ref_model), None
        log(f"training the new batches' weights on {used.n_obs} cells")
        model.train(max_epochs=args.max_epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    early_stopping=False, accelerator=args.accelerator, enable_progress_bar=not args.no_progress)
    train_s = time.perf_counter() - t_train

    latent, _, assign = store_embedding(query, model, on)
    ref_clusters = np.asarray(reference.obs["vmm_cluster"]).astype(int) if "vmm_cluster" in reference.obs else None
    metrics: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
        "data": {"path": str(args.data), "n_cells": int(query.n_obs), "n_genes": int(query.n_vars),
                 "n_genes_used": len(genes), "n_cells_left_out_empty": int(empty.sum()),
                 "batches": sorted(map(str, query.obs[batch_key].astype(str).unique())),
                 "reference_batches": ref_batches, "n_reference_cells": int(reference.n_obs)},
        # "embedded": every query batch is a reference batch, cells embedded by the frozen reference model;
        # "mapped": the new batches' weights were trained (scArches)
        "mode": "embedded" if frozen else "mapped",
        "utilized_clusters": int(np.unique(assign).size),
        "cluster_sizes": {str(k): int(v) for k, v in zip(*np.unique(assign, return_counts=True), strict=True)},
        "share_in_reference_clusters": (float(np.isin(assign, ref_clusters).mean()) if ref_clusters is not None
                                        else None),
        "label_transfer": None,
        "elbo": {"train_final": None if frozen else last_value(model.history, "elbo_train"),
                 "all_cells": -float(model.get_elbo(on))},
        "runtime_s": {"train": train_s},
        "environment": environment(model),
    }
    key = args.labels_key
    if key is not None:
        k = min(N_NEIGHBORS, reference.n_obs)
        transfer = knn_label_transfer(reference.obsm["X_vmm"], reference.obs[key].astype(str).to_numpy(), latent, k=k)
        query.obs[f"predicted_{key}"] = pd.Categorical(transfer.labels)
        query.obs[f"predicted_{key}_confidence"] = transfer.confidence.astype(np.float32)
        metrics["label_transfer"] = {"k": k, "mean_confidence": float(transfer.confidence.mean())}
        if key in query.obs:
            metrics["label_transfer"].update(label_transfer_scores(query.obs[key].astype(str), transfer.labels))

    out = Path(args.out)
    with staged(out, OUTPUTS) as staging:
        if not args.no_mde:
            from pyro_vmm.plotting import mde_figure

            log("drawing the MDE figure")
            both = anndata.AnnData(
                obs=pd.DataFrame({"dataset": ["reference"] * reference.n_obs + ["query"] * query.n_obs},
                                 index=np.arange(reference.n_obs + query.n_obs).astype(str)),
                obsm={"X_vmm": np.concatenate([reference.obsm["X_vmm"], latent]).astype(np.float32)},
            )
            both.obs["vmm_cluster"] = pd.Categorical(np.concatenate([
                ref_clusters if ref_clusters is not None else np.full(reference.n_obs, -1), assign]).astype(str))
            keys, titles = ["dataset"], {"dataset": "Reference and query", "vmm_cluster": "VMM cluster"}
            if key is not None:
                titles[key] = f"{key} (query: {'as given' if key in query.obs else 'transferred'})"
                truth = query.obs[key].astype(str) if key in query.obs else query.obs[f"predicted_{key}"].astype(str)
                both.obs[key] = pd.Categorical(np.concatenate([reference.obs[key].astype(str), truth]))
                keys.append(key)
            mde_figure(both, "X_vmm", color_keys=[*keys, "vmm_cluster"], path=staging / "mde.png", seed=args.seed,
                       titles=titles)
        if not frozen and model.history.get("elbo_train") is not None:
            from pyro_vmm.plotting import training_curves

            training_curves(model.history, path=staging / "training.png")
        if not frozen:  # embedded cells need no model of their own: the reference's is in --reference
            model.save(str(staging / "model"), overwrite=True)
        with atomic_path(staging / "adata.h5ad") as tmp:
            query.write_h5ad(tmp)
        metrics["runtime_s"]["total"] = time.perf_counter() - t_start
        with atomic_path(staging / "metrics.json") as tmp:
            tmp.write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n")
    log(f"done in {metrics['runtime_s']['total']:.0f} s: query cells in {metrics['utilized_clusters']} clusters; "
        f"outputs in {out}/")
    return 0
