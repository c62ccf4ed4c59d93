"""Lightning callbacks shared by the training entry points and the benchmarks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import numpy as np
from scvi.train._progress import ProgressBar

__all__ = ["ComponentMerging", "EpochProgressBar", "EpochTimer"]

logger = logging.getLogger(__name__)


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


class ComponentMerging(pl.Callback):
    r"""Merge moves on the mixture prior (``pl_module.module.prior``) at the end of the given epochs (1-based):
    ``cluster_of = rule()``, the cluster of each component (``-1``: dropped) computed from the cells by the
    final-cluster rule (:func:`~pyro_vmm.merging.cluster_components`), then ``prior.merge_components(cluster_of)``:
    each cluster keeps one component, with the weight of its whole group.

    MAP-EM has no Occam factor, so it spends several components on one population, and a population whose
    expression differs between batches can take one component per batch, which the ELBO's KL term then holds apart.
    After a merge move the KL term pulls the group's cells to one component, and the encoder and the EM steps adapt
    to it for the rest of the run.  Under data parallelism rank 0's grouping is used on every rank.  ``moves``
    records ``(epoch, components kept)`` of each move."""

    def __init__(self, rule: Callable[[], np.ndarray], epochs: Iterable[int]) -> None:
        self.rule = rule
        self.epochs = sorted({int(e) for e in epochs})
        self.moves: list[tuple[int, int]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch not in self.epochs:
            return
        # data-parallel: the ranks' BatchNorm running statistics differ, so rank 0's grouping is applied on every rank
        cluster_of = np.asarray(trainer.strategy.broadcast(np.asarray(self.rule()), src=0))
        pl_module.module.prior.merge_components(cluster_of)
        self.moves.append((epoch, int(np.unique(cluster_of[cluster_of >= 0]).size)))
        logger.info("epoch %d: merge move, %d mixture components kept", *self.moves[-1])
