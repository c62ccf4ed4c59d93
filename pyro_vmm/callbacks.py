"""Lightning callbacks shared by the training entry points and the benchmarks."""

from __future__ import annotations

import time

import lightning.pytorch as pl

__all__ = ["EpochTimer"]


def _sync(pl_module: pl.LightningModule) -> None:
    """Wait for queued CUDA work, so that an epoch's time includes its kernels (no-op on CPU)."""
    import torch

    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


class EpochTimer(pl.Callback):
    """Wall-clock and CPU seconds of every training epoch (``wall``, ``cpu``; validation excluded; on a GPU the
    clock waits for the epoch's kernels at both ends)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module)
        self._t, self._c = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module)
        self.wall.append(time.perf_counter() - self._t)
        self.cpu.append(time.process_time() - self._c)
