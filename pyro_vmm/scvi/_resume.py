r"""Checkpoint and exact resume of :meth:`pyro_vmm.scvi.VMMSCVI.train` (``checkpoint_dir=...``).

Every ``checkpoint_every`` epochs (and after the last one), at the end of the epoch (after validation and early
stopping have run), Lightning's full training state is written with :func:`pyro_vmm.scvi._checkpoint.save_checkpoint`
(atomic: a temporary file, fsync, ``os.replace``) to ``checkpoint_dir/checkpoint-<epochs done>.pt``; the two newest
are kept.  The file holds what Lightning saves (module ``state_dict``, both Adam states, epoch and global step,
loop progress, early-stopping state) and, under ``"pyro_vmm"``, what it does not:

* the Python / NumPy / torch (= Pyro) RNG states, restored at the start of the next epoch;
* the non-finite guard's counters; the metric history (``model.history``) so far;
* a fingerprint of the data (gene names, cells, batches) and of the run (seed, split sizes, batch size), checked
  before resuming, so a checkpoint of other data is refused with a clear error.

With the shuffling a pure function of ``(seed, epoch)`` (:class:`~pyro_vmm.scvi._data.MinibatchSampler`), a run
killed at any moment (even by SIGKILL, mid-epoch) and restarted with the same arguments redoes the interrupted epoch
from its start and ends with bit-identical parameters on CPU.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightning.pytorch.plugins.io import CheckpointIO

from ._checkpoint import checkpoint_path, load_checkpoint, prune_checkpoints, rng_state, save_checkpoint
from ..validation import InputError

__all__ = [
    "CHECKPOINT_KIND",
    "AtomicCheckpointIO",
    "EpochCheckpointer",
    "check_resume_payload",
    "find_resume_checkpoint",
    "run_fingerprint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "vmm-scvi-training"


class AtomicCheckpointIO(CheckpointIO):
    """Lightning checkpoint IO through :func:`~pyro_vmm.scvi._checkpoint.save_checkpoint` / ``load_checkpoint``.

    Writes are atomic and self-describing; reads are ``weights_only`` and refuse foreign or corrupted files with an
    :class:`~pyro_vmm.validation.InputError`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        save_checkpoint(path, _plain(checkpoint), kind=CHECKPOINT_KIND)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path, kind=CHECKPOINT_KIND, map_location=map_location)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        Path(path).unlink(missing_ok=True)


def _plain(obj: Any) -> Any:
    """Lightning's checkpoint with NumPy scalars and other harmless non-plain leaves made plain."""
    if isinstance(obj, dict):
        return type(obj)((k, _plain(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class EpochCheckpointer:
    """Called by the training plan at the end of each training epoch; writes every ``every`` epochs.

    ``extra`` (run fingerprint, shuffle seed) goes into the checkpoint's ``"pyro_vmm"`` entry."""

    def __init__(self, directory: str | os.PathLike, every: int = 1, keep: int = 2, extra: dict | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"checkpoint_every must be an integer >= 1 (epochs), got {every!r}.")
        self.directory = Path(directory)
        self.every, self.keep, self.extra = every, keep, dict(extra or {})

    def __call__(self, trainer, epochs_done: int) -> Path | None:
        last = trainer.max_epochs is not None and epochs_done >= trainer.max_epochs
        if not (epochs_done % self.every == 0 or last or trainer.should_stop):
            return None
        path = checkpoint_path(self.directory, epochs_done)
        trainer.save_checkpoint(path)  # collective; under DDP only global rank 0 writes
        if trainer.is_global_zero:
            prune_checkpoints(self.directory, keep=self.keep)
        logger.info("checkpoint written: %s", path)
        return path


# ---------------------------------------------------------------------------------------------------------------
# what goes into the "pyro_vmm" entry, and back
# ---------------------------------------------------------------------------------------------------------------
def training_extra(plan, extra: dict) -> dict:
    """The ``"pyro_vmm"`` entry of a checkpoint written now (at the end of an epoch)."""
    return {
        **extra,
        "rng": rng_state(),
        "guard": plan.guard_state(),
        "history": history_payload(plan.trainer.logger, plan.current_epoch, plan.last_epoch_metrics),
    }


def history_payload(lightning_logger, epoch: int, pending: dict[str, float]) -> dict:
    """scvi-tools' logger history as ``{metric: {"index": [...], "values": [...], "index_name": str}}``.

    ``pending`` are the epoch-level metrics logged this epoch, which reach the logger only after the checkpoint."""
    data = getattr(getattr(lightning_logger, "experiment", None), "data", None)
    out: dict[str, dict] = {}
    if isinstance(data, dict):
        for metric, frame in data.items():
            out[str(metric)] = {
                "index": [int(i) for i in frame.index],
                "values": [float(v) for v in frame.iloc[:, 0]],
                "index_name": str(frame.index.name or "epoch"),
            }
    for metric, value in pending.items():
        entry = out.setdefault(metric, {"index": [], "values": [], "index_name": "epoch"})
        if epoch not in entry["index"]:
            entry["index"].append(int(epoch))
            entry["values"].append(float(np.float32(value)))  # as Lightning logs it (a float32 tensor)
    return out


def restore_history(lightning_logger, payload: dict) -> None:
    """Put a :func:`history_payload` back into scvi-tools' ``SimpleLogger`` (other loggers: nothing to do)."""
    experiment = getattr(lightning_logger, "experiment", None)
    if not isinstance(getattr(experiment, "data", None), dict):
        return
    for metric, entry in payload.items():
        frame = pd.DataFrame({metric: pd.Series(entry["values"], dtype=object)})
        frame.index = pd.Index(entry["index"], name=entry["index_name"])
        experiment.data[metric] = frame


# ---------------------------------------------------------------------------------------------------------------
# fingerprints and checks before resuming
# ---------------------------------------------------------------------------------------------------------------
def _sha(items) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(str(item).encode())
        h.update(b"\0")
    return h.hexdigest()


def run_fingerprint(adata, adata_manager, splitter, *, seed: int | None, batch_size: int) -> dict:
    """What must be equal for a checkpoint to be resumed: data, split and minibatching."""
    from scvi import REGISTRY_KEYS

    batch_state = adata_manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY)
    block = getattr(splitter, "block_size", None)
    blocks = {} if block in (None, 1) else {"block_size": int(block)}  # the shuffle of a streamed run
    return {
        "var_names": [str(g) for g in adata.var_names],
        "n_obs": int(adata.n_obs),
        "obs_names_sha256": _sha(adata.obs_names),
        "batch_categories": [str(c) for c in batch_state.categorical_mapping],
        "split": {
            "n_train": int(splitter.n_train),
            "n_val": int(splitter.n_val),
            "train_idx_sha256": _sha(np.sort(np.asarray(splitter.train_idx))),
        },
        "seed": seed,
        "batch_size": int(batch_size),
        **blocks,
    }


def find_resume_checkpoint(directory: str | os.PathLike, resume: bool) -> Path | None:
    """The newest ``checkpoint-<n>.pt`` in ``directory`` to resume from (``None``: start a fresh run).

    Refuses to silently start over in a folder holding checkpoints (``resume=False``) and never skips a newest file
    that cannot be read: both raise :class:`InputError` saying what to do."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"checkpoint_dir {str(directory)!r} is a file. Fix: pass a folder (it is created if missing).")
    found = sorted(directory.glob("checkpoint-*.pt")) if directory.is_dir() else []
    found = [p for p in found if p.name[11:-3].isdigit()]
    if not found:
        return None
    newest = found[-1]
    if not resume:
        raise InputError(
            f"checkpoint_dir {str(directory)!r} already holds checkpoints ({newest.name} is the newest) and "
            "resume=False. Fix: pass resume=True to continue that run, or an empty or new checkpoint_dir "
            "(or delete the checkpoint-*.pt files) to start over."
        )
    return newest


def check_resume_payload(path: Path, payload: dict, fingerprint: dict, module_state: dict) -> None:
    """Raise :class:`InputError` if the checkpoint at ``path`` is not a resumable state of this run."""
    ours = payload.get("pyro_vmm") if isinstance(payload, dict) else None
    if not isinstance(ours, dict) or "state_dict" not in payload or "var_names" not in ours:
        raise InputError(
            f"checkpoint {str(path)!r} is not a VMMSCVI training checkpoint (no pyro-vmm training state in it). "
            "Fix: point checkpoint_dir at a folder written by VMMSCVI.train(checkpoint_dir=...), or an empty one."
        )
    fix = (
        "Fix: train on the same AnnData (same genes and cells) with the same seed, train_size and batch_size as "
        "the run that wrote it, or pass another (empty) checkpoint_dir to start a new run."
    )
    genes, old_genes = fingerprint["var_names"], ours["var_names"]
    if genes != old_genes:
        first = next((i for i, (a, b) in enumerate(zip(old_genes, genes, strict=False)) if a != b), None)
        where = (
            f"first difference at position {first}: {old_genes[first]!r} in the checkpoint, {genes[first]!r} here"
            if first is not None
            else "one gene list is a prefix of the other"
        )
        raise InputError(
            f"checkpoint {str(path)!r} was trained on different genes ({len(old_genes)} genes in the checkpoint, "
            f"{len(genes)} here; {where}). {fix}"
        )
    if (ours["n_obs"], ours["obs_names_sha256"]) != (fingerprint["n_obs"], fingerprint["obs_names_sha256"]):
        raise InputError(
            f"checkpoint {str(path)!r} was trained on different cells ({ours['n_obs']} cells in the checkpoint, "
            f"{fingerprint['n_obs']} here, or the same number with other names). {fix}"
        )
    if ours["batch_categories"] != fingerprint["batch_categories"]:
        raise InputError(
            f"checkpoint {str(path)!r} was trained with batches {ours['batch_categories']}, here they are "
            f"{fingerprint['batch_categories']}. {fix}"
        )
    for key, what in (("seed", "seed"), ("batch_size", "batch_size"), ("split", "train/validation split")):
        if ours.get(key) != fingerprint[key]:
            raise InputError(
                f"checkpoint {str(path)!r} was written by a run with another {what} ({ours.get(key)!r} there, "
                f"{fingerprint[key]!r} here); resuming would not continue the same run. {fix}"
            )
    saved = {k[len("module."):]: v for k, v in payload["state_dict"].items() if k.startswith("module.")}
    mismatched = [
        f"{k}: {tuple(saved[k].shape) if k in saved else 'missing'} vs {tuple(v.shape)}"
        for k, v in module_state.items()
        if k not in saved or tuple(saved[k].shape) != tuple(v.shape)
    ] + [f"{k}: extra in the checkpoint" for k in saved if k not in module_state]
    if mismatched:
        raise InputError(
            f"checkpoint {str(path)!r} holds a model of another shape ({'; '.join(mismatched[:3])}"
            f"{'; ...' if len(mismatched) > 3 else ''}). Fix: create the model with the same arguments (prior, "
            "n_clusters, n_latent, n_hidden, n_layers, gene_likelihood) as the run that wrote it, or pass another "
            "checkpoint_dir."
        )


def load_training_checkpoint(path: Path, kind: str) -> dict:
    """Read a training checkpoint, adding to a read error what :meth:`PyroVMMModel.train` can do about it."""
    try:
        return load_checkpoint(path, kind=kind)
    except InputError as err:
        raise InputError(
            f"cannot resume from the newest checkpoint in {str(path.parent)!r}: {err} To resume from the previous "
            f"checkpoint in that folder, delete {path.name}; to start over, pass another (empty) checkpoint_dir."
        ) from err
