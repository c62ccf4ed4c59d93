"""Lightning callbacks shared by the training entry points and the benchmarks."""

from __future__ import annotations

import time

import lightning.pytorch as pl
from scvi.train._progress import ProgressBar

__all__ = ["EpochProgressBar", "EpochTimer"]


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


class EpochProgressBar(ProgressBar):
    """scvi-tools' per-epoch progress bar, its postfix the last finished epoch's ``train_loss`` (−ELBO per cell) and
    ``clusters`` (components in use on the epoch's training cells, else on the validation cells) instead of
    ``v_num``."""

    #: logged metric -> name on the bar; the first one logged wins for each name
    SHOWN = (("elbo_train", "train_loss"), ("utilized_clusters_train", "clusters"),
             ("utilized_clusters_validation", "clusters"))

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        logged = trainer.callback_metrics
        shown: dict = {}
        for key, name in self.SHOWN:
            if key in logged and name not in shown:
                value = float(logged[key])
                shown[name] = int(round(value)) if name == "clusters" else f"{value:.4g}"
        return shown

    # Lightning runs the callbacks' on_train_epoch_end before the module's, which logs the epoch's training loss:
    # the postfix is therefore set when the next epoch starts, and once more when training ends
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_update(trainer.current_epoch, trainer.max_epochs):
            self.main_progress_bar.update()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.is_enabled and trainer.current_epoch > 0:
            self.main_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_enabled:
            self.main_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
        super().on_train_end(trainer, pl_module)
