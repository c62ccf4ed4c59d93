"""Atomic, self-describing checkpoint files, and the RNG state needed to resume a run exactly.

A checkpoint is one ``torch.save`` zip file holding::

    {"format": "pyro-vmm-checkpoint", "version": 1, "kind": kind, "payload": payload,
     "torch_version": ..., "pyro_version": ..., "pyro_vmm_version": ...}

It is written to a temporary file in the same folder, flushed to disk, then moved into place with ``os.replace``
(:func:`pyro_vmm.utils.atomic_path`), so a process killed mid-write (even by SIGKILL) leaves either the previous
file or the new one, never half of one.

Safety: :func:`load_checkpoint` always reads with ``torch.load(..., weights_only=True)``, PyTorch's restricted
unpickler that rebuilds only tensors and plain containers and never runs code from the file, so opening a
checkpoint from an untrusted source is safe.  In exchange, a payload may hold only ``dict``/``list``/``tuple``/
``set``, ``str``/``bytes``/numbers/``bool``/``None`` and torch tensors/sizes/dtypes/devices;
:func:`save_checkpoint` checks this *before* writing and names the offending key, so a file that could not be
loaded back is never written.  (NumPy arrays: store ``torch.from_numpy(a)`` or ``a.tolist()``.)

Exact resume (same final parameters as an uninterrupted run) in a plain loop::

    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, kind="my-model")
        module.load_state_dict(state["module"]); svi.load_state_dict(state["optim"])
        set_rng_state(state["rng"]); start = state["step"]
    for step in range(start, n_steps):
        svi.step(next_batch())                       # minibatch indices drawn from the global torch RNG
        save_checkpoint(checkpoint_path(run_dir, step + 1), {"module": module.state_dict(),
                        "optim": svi.state_dict(), "rng": rng_state(), "step": step + 1}, kind="my-model")

Mid-epoch resume also needs the data order: draw each epoch's permutation from the global RNG at the epoch start
and store it (or the RNG state from that moment) and the batch index in the payload.
"""

from __future__ import annotations

import collections
import os
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils import atomic_path
from ..validation import InputError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "checkpoint_path",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "read_saved_model",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "pyro-vmm-checkpoint"
#: bump when the layout of the file changes; files with a larger version are refused with "upgrade pyro-vmm"
CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
_SAFE_LEAVES = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.Size, torch.dtype, torch.device)
_SAFE_DICTS = (dict, collections.OrderedDict, collections.Counter)


def _versions() -> dict[str, str]:
    import pyro

    from .. import __version__

    # str(): torch.__version__ is a TorchVersion, which a weights_only load refuses
    return {
        "torch_version": str(torch.__version__),
        "pyro_version": str(pyro.__version__),
        "pyro_vmm_version": str(__version__),
    }


def _check_loadable(obj: Any, where: str) -> None:
    """Raise InputError naming the first object that ``torch.load(weights_only=True)`` could not rebuild."""
    kind = type(obj)
    if kind in _SAFE_LEAVES or kind in (torch.Tensor, torch.nn.Parameter):
        return
    if kind in _SAFE_DICTS:
        for key, value in obj.items():
            _check_loadable(key, f"{where} (a key)")
            _check_loadable(value, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, set):
        for i, value in enumerate(obj):
            _check_loadable(value, f"{where}[{i}]")
        return
    fix = "store torch.from_numpy(x) or x.tolist()" if isinstance(obj, np.ndarray | np.generic) else (
        "convert it to a dict/list/str/number or a tensor (e.g. dataclasses.asdict(x), list(x), str(x))"
    )
    raise InputError(
        f"cannot checkpoint {where}: it is a {kind.__module__}.{kind.__qualname__}, which a safe "
        f"(weights_only) load cannot rebuild. Fix: {fix}."
    )


def save_checkpoint(path: str | os.PathLike, payload: dict, *, kind: str) -> Path:
    """Write ``payload`` under a self-describing header to ``path``, atomically; return the path.

    ``kind`` names what the payload is (e.g. ``"vmm-scvi"``), and :func:`load_checkpoint` refuses another kind.
    """
    if not isinstance(kind, str) or not kind:
        raise InputError(f"kind must be a non-empty string naming the checkpoint's content, got {kind!r}.")
    if not isinstance(payload, dict):
        raise InputError(f"payload must be a dict, got a {type(payload).__name__}. Fix: wrap it, e.g. {{'state': x}}.")
    _check_loadable(payload, "payload")
    record = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": kind, **_versions()}
    record["payload"] = payload
    target = Path(path)
    if target.is_dir():
        raise InputError(f"cannot write a checkpoint to {str(target)!r}: it is a folder. Fix: pass a file path.")
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            torch.save(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
    return target


def _describe_foreign(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK\x03\x04"):
        return (
            f"checkpoint {str(path)!r} is truncated or corrupted ({path.stat().st_size:,} bytes; its zip index is "
            "missing, as after a partial copy or a crash of a non-atomic writer). Fix: use an earlier checkpoint "
            "(latest_checkpoint skips unreadable files) or copy the file again."
        )
    if head[:1] == b"\x80":
        return (
            f"{str(path)!r} is not a pyro-vmm checkpoint: it is a plain pickle or a legacy torch.save file. "
            "Fix: pass a file written by pyro_vmm.scvi._checkpoint.save_checkpoint."
        )
    return (
        f"{str(path)!r} is not a pyro-vmm checkpoint (it starts with {head!r}, not a torch zip archive). "
        "Fix: pass a file written by pyro_vmm.scvi._checkpoint.save_checkpoint."
    )


def load_checkpoint(path: str | os.PathLike, *, kind: str, map_location: Any = None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` and return its payload.

    Raises :class:`~pyro_vmm.validation.InputError` for a missing file, a truncated or corrupted file (zip CRCs
    are verified), a file that is not a pyro-vmm checkpoint, another ``kind`` or a newer format version.
    ``map_location`` is passed to ``torch.load``; when it is ``None`` and CUDA is unavailable, ``"cpu"`` is used,
    so a checkpoint written on a GPU opens on a CPU-only machine.
    """
    path = Path(path)
    if not path.exists():
        near = sorted(p.name for p in path.parent.glob("*.pt"))[:5] if path.parent.is_dir() else []
        hint = f" Files in that folder: {', '.join(near)}." if near else ""
        raise InputError(
            f"checkpoint not found: {str(path)!r}.{hint} Fix: check the path; "
            "pyro_vmm.scvi._checkpoint.latest_checkpoint(folder) finds the newest one."
        )
    if path.is_dir():
        raise InputError(
            f"{str(path)!r} is a folder, not a checkpoint file. "
            "Fix: pass a file, or use pyro_vmm.scvi._checkpoint.latest_checkpoint(folder)."
        )
    if path.stat().st_size == 0:
        raise InputError(f"checkpoint {str(path)!r} is empty (0 bytes). Fix: use an earlier checkpoint.")
    if not zipfile.is_zipfile(path):
        raise InputError(_describe_foreign(path))
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise InputError(f"checkpoint {str(path)!r} is corrupted ({err}). Fix: use an earlier checkpoint.") from err
    if bad is not None:
        raise InputError(
            f"checkpoint {str(path)!r} is corrupted: the checksum of its entry {bad!r} does not match. "
            "Fix: use an earlier checkpoint or copy the file again."
        )
    if map_location is None and not torch.cuda.is_available():
        map_location = "cpu"
    try:
        record = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch raises many types here; all mean "cannot read this file"
        import pickle

        if isinstance(err, pickle.UnpicklingError):
            raise InputError(
                f"{str(path)!r} is not a pyro-vmm checkpoint: it holds Python objects other than tensors and plain "
                "containers, which pyro-vmm never writes and which are not loaded for safety. Fix: pass a file "
                "written by pyro_vmm.scvi._checkpoint.save_checkpoint (only if you trust the file: "
                "torch.load(path, weights_only=False))."
            ) from err
        raise InputError(
            f"checkpoint {str(path)!r} could not be read ({type(err).__name__}: {str(err)[:200]}). "
            "Fix: use an earlier checkpoint."
        ) from err
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        what = f"a dict with keys {_short_keys(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
        raise InputError(
            f"{str(path)!r} is not a pyro-vmm checkpoint: it is a torch file holding {what}, without "
            f"format={CHECKPOINT_FORMAT!r}. Fix: pass a file written by pyro_vmm.scvi._checkpoint.save_checkpoint."
        )
    version = record.get("version")
    if not isinstance(version, int) or version < 1 or "payload" not in record:
        raise InputError(
            f"checkpoint {str(path)!r} has a damaged header (version={version!r}). Fix: use an earlier checkpoint."
        )
    if version > CHECKPOINT_VERSION:
        raise InputError(
            f"checkpoint {str(path)!r} has format version {version}, written by pyro-vmm "
            f"{record.get('pyro_vmm_version', '?')}; this pyro-vmm reads versions <= {CHECKPOINT_VERSION}. "
            f"Fix: upgrade pyro-vmm to {record.get('pyro_vmm_version', 'the version that wrote it')} or later."
        )
    if record.get("kind") != kind:
        raise InputError(
            f"checkpoint {str(path)!r} holds a {record.get('kind')!r} checkpoint, expected {kind!r}. "
            "Fix: pass the checkpoint of the right model, or the matching kind."
        )
    return record["payload"]


def _short_keys(record: dict) -> str:
    keys = [repr(k) for k in list(record)[:6]]
    return "[" + ", ".join(keys) + (", ...]" if len(record) > 6 else "]")


# ---------------------------------------------------------------------------------------------------------------
# checkpoint folders
# ---------------------------------------------------------------------------------------------------------------
def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """``directory / "checkpoint-{step:09d}.pt"``: the name :func:`latest_checkpoint` understands."""
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise InputError(f"step must be an integer >= 0, got {step!r}.")
    return Path(directory) / f"checkpoint-{int(step):09d}.pt"


def _numbered(directory: Path) -> list[tuple[int, Path]]:
    if not directory.exists():
        return []
    if not directory.is_dir():
        raise InputError(f"{str(directory)!r} is a file, not a checkpoint folder. Fix: pass the folder.")
    found = []
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The ``checkpoint-<step>.pt`` with the largest step whose zip structure is intact; ``None`` if there is none.

    A missing folder gives ``None`` (a fresh run).  Unreadable files are skipped with a warning; temporary files
    of an interrupted write (``.checkpoint-*.tmp``) are never considered.
    """
    for step, path in reversed(_numbered(Path(directory))):
        if zipfile.is_zipfile(path):
            return path
        warnings.warn(f"skipping unreadable checkpoint {str(path)!r} (step {step})", RuntimeWarning, stacklevel=2)
    return None


def prune_checkpoints(directory: str | os.PathLike, keep: int = 2) -> list[Path]:
    """Delete all but the ``keep`` newest numbered checkpoints and stale temporary files; return what was removed."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise InputError(f"keep must be an integer >= 1, got {keep!r}.")
    directory = Path(directory)
    numbered = _numbered(directory)
    removed = [path for _, path in numbered[: max(0, len(numbered) - keep)]]
    if directory.is_dir():
        removed += [p for p in directory.glob(".checkpoint-*.tmp") if p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Capture the Python, NumPy and torch (CPU, and every CUDA device when available) RNG states.

    Pyro draws its random numbers from torch's global generator (and ``pyro.set_rng_seed`` seeds exactly these
    three), so this is also Pyro's RNG state.  The result holds only tensors and plain values, so it can go into
    a checkpoint payload.
    """
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured, so the run continues the same random streams."""
    missing = [k for k in ("python", "numpy", "torch") if not isinstance(state, dict) or k not in state]
    if missing:
        raise InputError(
            f"not an RNG state: missing {missing}. Fix: pass what pyro_vmm.scvi._checkpoint.rng_state() returned."
        )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    key = np_state["key"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np.asarray(key.cpu().numpy() if torch.is_tensor(key) else key, dtype=np.uint32),
                      "pos": int(np_state["pos"])},
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            warnings.warn(
                "the RNG state has CUDA generator states but CUDA is not available: CUDA random streams are not "
                "restored (a CPU run continues exactly; GPU sampling would differ)",
                RuntimeWarning,
                stacklevel=2,
            )
        elif len(cuda) != torch.cuda.device_count():
            warnings.warn(
                f"the RNG state has {len(cuda)} CUDA generator states but {torch.cuda.device_count()} devices are "
                "visible: restoring the first ones only",
                RuntimeWarning,
                stacklevel=2,
            )
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)
        else:
            torch.cuda.set_rng_state_all(cuda)


def read_saved_model(dir_path: str | os.PathLike, model_name: str, prefix: str | None = None) -> dict:
    """The contents of ``dir_path/{prefix}model.pt`` written by ``model_name``'s ``save``; clear errors for a missing,
    unreadable or foreign file, or one of another model class."""
    path = Path(dir_path) / f"{prefix or ''}model.pt"
    if not path.is_file():
        raise InputError(f"no saved model at {str(path)!r}. Fix: pass the folder written by model.save(dir_path).")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, garbage, or not a torch file at all
        raise InputError(
            f"cannot read the saved model {str(path)!r} ({type(err).__name__}: {err}); the file is corrupted or "
            "was not written by model.save(). Fix: save the model again, or restore the folder from a copy."
        ) from err
    if not isinstance(saved, dict) or "model_state_dict" not in saved or "attr_dict" not in saved:
        raise InputError(
            f"{str(path)!r} is not a saved scvi-tools model (no model_state_dict/attr_dict in it). "
            f"Fix: pass the folder written by {model_name}.save(dir_path)."
        )
    class_name = saved["attr_dict"].get("registry_", {}).get("model_name")
    if class_name not in (None, model_name):
        raise InputError(
            f"{str(path)!r} holds a {class_name} model, not a {model_name}. Fix: load it with "
            f"{class_name}.load(...), or pass the folder of a saved {model_name}."
        )
    return saved
