"""Small helpers shared by models, training loops and the command line."""

from __future__ import annotations

import contextlib
import os
import random
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

__all__ = ["atomic_path", "benchmark_header", "eval_mode", "inverse_softplus", "resolve_device", "set_seed"]


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Temporarily put modules in eval mode (BatchNorm running stats, no dropout), restoring their flags after.

    The flags are set directly, as ``Module.train(False)`` sets them (one traversal, no ``__setattr__`` hooks: this
    runs several times per training step)."""
    subs = [m for mod in modules for m in mod.modules()]
    flags = [m.training for m in subs]
    for m in subs:
        object.__setattr__(m, "training", False)
    try:
        yield
    finally:
        for m, flag in zip(subs, flags):
            object.__setattr__(m, "training", flag)


def inverse_softplus(y: torch.Tensor, floor: float = 1e-4) -> torch.Tensor:
    r"""Stable :math:`\mathrm{softplus}^{-1}(y) = y + \log(1 - e^{-y})` for ``y >= floor`` (values below are clamped).

    Used to initialise softplus-parameterised pseudo-inputs from counts (``log(expm1(y))`` overflows for y > 88).
    """
    y = y.clamp_min(floor)
    return y + torch.log(-torch.expm1(-y))


def set_seed(seed: int | None) -> None:
    """Seed Python, NumPy, torch and Pyro so that a CPU run is repeatable.  ``None`` leaves the RNGs alone."""
    if seed is None:
        return
    import pyro

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``'auto'`` picks CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    Readers never see a half-written file, and a failed write leaves any previous file untouched.  The file gets the
    permissions a plain ``open(path, "w")`` would give (an existing file's mode, else ``0o666`` less the umask), not
    the owner-only ``0o600`` of the temporary file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, _file_mode(target))
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _file_mode(target: Path) -> int:
    """Permission bits for a file written to ``target``: the existing file's, else ``0o666`` less the umask."""
    if target.is_file():
        return stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def benchmark_header(name: str, argv: list[str]) -> dict[str, str]:
    """The first keys of a benchmark's JSON: its name, the command that ran it, the date and the machine (cores, torch
    threads and the load average at the end, so a busy box shows)."""
    import datetime
    import platform

    return {
        "benchmark": name,
        "command": "python " + " ".join(argv),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, CPU only, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads; load average at the end {os.getloadavg()[0]:.2f}",
    }
