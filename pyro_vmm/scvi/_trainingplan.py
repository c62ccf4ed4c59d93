r"""Lightning training plan of VMM-scVI: the alternating VI / EM step of :class:`~pyro_vmm.infer.AlternatingSVI`.

Per minibatch (manual optimisation, two torch Adam optimisers with disjoint parameters),
:meth:`AlternatingSVI.alternating_step <pyro_vmm.infer.AlternatingSVI.alternating_step>` with Lightning's
``manual_backward``:

1. VI step on the networks (and, for ``vampprior``, the pseudo-inputs): zero all gradients,
   ``loss = svi.vi_loss(*args)`` (batch mean of :math:`-\mathrm{ELBO}_n`), backward, VI Adam step;
2. EM step on the prior parameters (``gmm``/``vmm`` only): draw :math:`z \sim q(z|x)` with the networks in eval
   mode and no gradient, ``svi.em_loss_at(z)`` (identical to ``svi.em_loss(*args)``, which does exactly these two
   things), backward, EM Adam step.

Each loss is built with the other step's parameters frozen (``requires_grad=False``), so its backward pass leaves
gradients on its own parameters only and neither optimiser sees the other loss's gradients; all gradients are set
to ``None`` before and after each step.  The EM optimiser is stepped unwrapped, so
``trainer.global_step`` counts minibatches (``max_steps`` means minibatches), not optimiser steps.  The two
optimisers are ``AlternatingSVI.build_optimizers()``'s, rebuilt with ``fused=True`` (same update, one kernel; 4x
cheaper on CPU) where torch supports it.

KL warm-up (``n_epochs_kl_warmup``, as scvi-tools' ``TrainingPlan``): the VI loss of epoch :math:`e` is
:math:`-\mathbb E_q\log p(x\mid z) + \beta_e\,\mathrm{KL}(q\,\|\,p)` with :math:`\beta_e = \min(1, e / E_w)`
(``None``: :math:`\beta = 1`, the paper's loss).  The EM step and the validation ELBO are not weighted.

Logged once per epoch, as Python floats: ``elbo_train`` (mean per-cell negative ELBO over the epoch),
``em_loss_train`` (mean EM loss) and, on validation epochs, ``elbo_validation`` (networks in eval mode; scvi-tools'
early stopping monitors it) and ``utilized_clusters_validation`` (number of components that are
:math:`\arg\max_k q(c=k|z)` of at least one validation cell, z the posterior mean, as in the final evaluation).
``track_utilized_clusters=True`` adds ``utilized_clusters_train``, the reference's per-epoch count over training
cells (z the EM-step samples, assignments from the EM step's own mixture parameters: no extra encoder pass).

NaN safety (``nan_guard=True``, the default): each minibatch's VI + EM pair runs under a
:class:`~pyro_vmm.guard.NonFiniteGuard`.  After the pair, the two losses and every parameter and floating buffer
are checked; a non-finite value (or an error about invalid values) rolls the module and both Adam states back to
the last good copy, multiplies both learning rates by ``nan_lr_factor`` (:math:`\eta \leftarrow 0.5\,\eta`),
logs a warning naming the epoch, batch and new rates, and skips the minibatch.  After ``max_nan_retries``
rollbacks in a row :class:`~pyro_vmm.guard.NonFiniteError` is raised.  The good copy is refreshed (in-place, into
preallocated buffers) every ``guard_every`` kept steps (default 10: ~2.5 % of a step on CPU, against ~8.5 % for
``guard_every=1``, which rolls back exactly the failed step; with 10 a rollback also undoes up to 9 good steps).  ``elbo_train`` averages the kept minibatches only; ``nan_rollbacks`` (logged
per epoch) counts the rolled-back ones in total.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pyro
import torch
from torch import Tensor

from ..guard import NonFiniteGuard, guarded_step
from ..infer import AlternatingSVI

__all__ = ["VMMTrainingPlan", "ddp_strategy", "is_data_parallel"]

#: per-epoch metrics also logged to the progress bar (the training loss and the utilized clusters)
PROGRESS_BAR_METRICS = ("elbo_train", "utilized_clusters_train")


class VMMTrainingPlan(pl.LightningModule):
    r"""Train a Pyro scVI module (``model``/``guide``/``prior``) with the alternating VI / EM steps.

    Parameters
    ----------
    module
        A :class:`~pyro_vmm.models.scvi.VMMSCVIModule` (or any module meeting :class:`AlternatingSVI`'s contract that
        also has ``_get_fn_args_from_batch``).
    track_utilized_clusters
        Also log ``utilized_clusters_train`` (an argmax per step on the EM step's parameters, no host sync).
    fused_adam
        Rebuild both Adam optimisers with ``fused=True`` (falls back to the plain ones where unsupported).
    validate_distributions
        Keep Pyro's distribution argument/support checks on during training (off by default: the counts were checked
        by ``setup_anndata``, and the checks cost ~5% of a step).
    nan_guard
        Run each step under the non-finite guard (see the module docstring).
    max_nan_retries
        Rollbacks in a row allowed before :class:`~pyro_vmm.guard.NonFiniteError`.
    nan_lr_factor
        Factor in (0, 1] applied to both learning rates at each rollback.
    guard_every
        Refresh the guard's good copy every this many kept steps (1: roll back exactly the failed step; the
        default 10 costs about a third as much and may also undo up to 9 good steps).
    n_epochs_kl_warmup
        Epochs of linear KL warm-up, :math:`\beta_e = \min(1, e / E_w)` (``None``: no warm-up).
    **svi_kwargs
        The step's settings, passed to :class:`~pyro_vmm.infer.AlternatingSVI` (``lr``, ``prior_lr_ratio``,
        ``adam_eps``, ``attach_responsibilities``; its defaults where not given).  Its optimisers are built by
        :meth:`configure_optimizers`.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        track_utilized_clusters: bool = False,
        validate_distributions: bool = False,
        fused_adam: bool = True,
        nan_guard: bool = True,
        max_nan_retries: int = 5,
        nan_lr_factor: float = 0.5,
        guard_every: int = 10,
        n_epochs_kl_warmup: int | None = None,
        **svi_kwargs,
    ) -> None:
        super().__init__()
        if n_epochs_kl_warmup is not None and (isinstance(n_epochs_kl_warmup, bool) or int(n_epochs_kl_warmup) < 0):
            raise ValueError(f"n_epochs_kl_warmup must be None or an integer >= 0, got {n_epochs_kl_warmup!r}")
        self.n_epochs_kl_warmup = None if n_epochs_kl_warmup is None else int(n_epochs_kl_warmup)
        self.module = module
        self.svi = AlternatingSVI(module, make_optimizers=False, **svi_kwargs)
        self.automatic_optimization = False
        self.track_utilized_clusters = track_utilized_clusters
        self.validate_distributions = validate_distributions
        self.fused_adam = fused_adam
        if isinstance(guard_every, bool) or not isinstance(guard_every, int) or guard_every < 1:
            raise ValueError(f"guard_every must be an integer >= 1, got {guard_every!r}; e.g. guard_every=1")
        if isinstance(max_nan_retries, bool) or not isinstance(max_nan_retries, int) or max_nan_retries < 0:
            raise ValueError(f"max_nan_retries must be an integer >= 0, got {max_nan_retries!r}; e.g. 5")
        if not 0 < nan_lr_factor <= 1:
            raise ValueError(f"nan_lr_factor must be in (0, 1], got {nan_lr_factor!r}; e.g. 0.5 halves the rate")
        self.nan_guard = nan_guard
        self.max_nan_retries = max_nan_retries
        self.nan_lr_factor = nan_lr_factor
        self.guard_every = guard_every
        self.guard: NonFiniteGuard | None = None
        self._kept_since_snapshot = 0
        #: guard counters / RNG state restored from a checkpoint, applied when training starts (see resume.py)
        self._resume_state: dict | None = None
        #: epoch-level values logged by on_train_epoch_end (a checkpoint written at that epoch's end stores them)
        self.last_epoch_metrics: dict[str, float] = {}
        #: writes checkpoints at the end of training epochs (:class:`pyro_vmm.scvi._resume.EpochCheckpointer`)
        self.checkpointer = None
        self.n_obs_training: int | None = None  # set by scvi's TrainRunner
        self.n_obs_validation: int | None = None
        self._reset_train_accumulators()
        self._reset_val_accumulators()

    # ---------------------------------------------------------------------------------------------- optimisers
    @property
    def kl_weight(self) -> float:
        r""":math:`\beta_e = \min(1, e / E_w)` at the current epoch :math:`e` (1 without warm-up)."""
        if not self.n_epochs_kl_warmup:
            return 1.0
        return min(1.0, self.current_epoch / self.n_epochs_kl_warmup)

    @property
    def has_em_step(self) -> bool:
        """The prior has MAP parameters and is not frozen (``module.frozen_prior``: a query model, see
        :mod:`pyro_vmm.scvi._query`)."""
        return self.module.prior.has_em_step and not self.module.frozen_prior

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        vi, em = self.svi.build_optimizers()
        if not self.has_em_step:
            em = None
        if vi is None:
            raise RuntimeError("the module has no parameters for the VI step")
        if self.fused_adam:
            vi, em = _fused(vi), _fused(em)
        return [vi] if em is None else [vi, em]

    def _optimizer_list(self) -> tuple[list, list]:
        wrapped = self.optimizers()
        raw = self.optimizers(use_pl_optimizer=False)
        if not isinstance(wrapped, list):
            wrapped, raw = [wrapped], [raw]
        return wrapped, raw

    # ---------------------------------------------------------------------------------------------- accumulators
    def _reset_train_accumulators(self) -> None:
        self._elbo_sum: Tensor | None = None
        self._em_sum: Tensor | None = None
        self._n_train = 0
        self._n_em = 0
        self._used: Tensor | None = None

    def _reset_val_accumulators(self) -> None:
        self._val_sum: Tensor | None = None
        self._n_val = 0
        self._val_used: Tensor | None = None

    @staticmethod
    def _add(acc: Tensor | None, value: Tensor) -> Tensor:
        value = value.detach()
        return value if acc is None else acc + value

    # ---------------------------------------------------------------------------------------------- steps
    # ---------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from ._resume import training_extra

        checkpoint["pyro_vmm"] = training_extra(self, self.checkpointer.extra if self.checkpointer else {})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume_state = dict(checkpoint.get("pyro_vmm") or {})
        history = self._resume_state.pop("history", None)
        if history:
            from ._resume import restore_history

            restore_history(self.trainer.logger, history)

    def on_train_epoch_start(self) -> None:
        # a resumed run continues the random streams saved at the end of the checkpointed epoch
        rng = (self._resume_state or {}).pop("rng", None)
        if rng is not None:
            from ._checkpoint import set_rng_state

            set_rng_state(rng)

    def on_train_start(self) -> None:
        if self.nan_guard:
            _, raw = self._optimizer_list()
            self.guard = NonFiniteGuard(
                self.module,
                raw,
                max_retries=self.max_nan_retries,
                lr_factor=self.nan_lr_factor,
                agree=_all_ranks_agree if self.trainer.world_size > 1 else None,
            )
            counters = (self._resume_state or {}).get("guard")
            if counters:
                self.guard.consecutive_rollbacks = int(counters["consecutive_rollbacks"])
                self.guard.n_rollbacks = int(counters["n_rollbacks"])
            self._kept_since_snapshot = 0

    def guard_state(self) -> dict[str, int]:
        """The guard's counters (for checkpoints); zeros without a guard."""
        g = self.guard
        return {
            "consecutive_rollbacks": g.consecutive_rollbacks if g else 0,
            "n_rollbacks": g.n_rollbacks if g else 0,
        }

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        with pyro.validation_enabled(self.validate_distributions):
            if self.guard is None:
                self._accumulate(*self._alternating_step(batch))
                return
            out: list = []

            def step():
                out[:] = self._alternating_step(batch)
                return out[1], out[2]  # (vi loss, em loss) are checked, with every parameter and buffer

            where = f"epoch {self.current_epoch}, batch {batch_idx} (global step {self.global_step})"
            snapshot_due = self._kept_since_snapshot + 1 >= self.guard_every
            if guarded_step(self.guard, step, where=where, store=snapshot_due):
                self._kept_since_snapshot = 0 if snapshot_due else self._kept_since_snapshot + 1
                self._accumulate(*out)
            else:
                self._kept_since_snapshot = 0

    def _alternating_step(self, batch: dict[str, Tensor]) -> tuple[int, Tensor, Tensor | None, Tensor | None]:
        """One VI step then one EM step; returns ``(n, vi_loss, em_loss, assignments)`` (detached; EM parts ``None``
        if no EM; assignments only with ``track_utilized_clusters``, from the EM step's own pseudo-input pass)."""
        args, kwargs = self.module._get_fn_args_from_batch(batch)
        n = int(args[0].shape[0])
        (vi_opt, *_), (_, *raw_rest) = self._optimizer_list()
        vi_loss, em_loss, assign = self.svi.alternating_step(
            vi_opt,
            raw_rest[0] if raw_rest else None,
            *args,
            kl_weight=self.kl_weight,
            backward=self.manual_backward,
            assignments=self.track_utilized_clusters,
            **kwargs,
        )
        return n, vi_loss, em_loss, assign

    def _accumulate(self, n: int, vi_loss: Tensor, em_loss: Tensor | None, assign: Tensor | None) -> None:
        self._elbo_sum = self._add(self._elbo_sum, vi_loss * n)
        self._n_train += n
        if em_loss is not None:
            self._em_sum = self._add(self._em_sum, em_loss * n)
            self._n_em += n
        if assign is not None:
            if self._used is None:
                self._used = torch.zeros(self.module.prior.n_components, dtype=torch.bool, device=assign.device)
            self._used[assign] = True

    def on_train_epoch_end(self) -> None:
        metrics: dict[str, float] = {}
        if self._n_train:
            metrics["elbo_train"] = float(self._elbo_sum) / self._n_train
        if self._n_em:
            metrics["em_loss_train"] = float(self._em_sum) / self._n_em
        if self._used is not None:
            metrics["utilized_clusters_train"] = float(self._used.sum())
        if self.n_epochs_kl_warmup:
            metrics["kl_weight"] = self.kl_weight
        if self.guard is not None and self.guard.n_rollbacks:
            metrics["nan_rollbacks"] = float(self.guard.n_rollbacks)
        for key, value in metrics.items():  # the loss and the clusters also on the progress bar
            self.log(key, value, prog_bar=key in PROGRESS_BAR_METRICS)
        self.last_epoch_metrics = metrics
        self._reset_train_accumulators()
        if self.trainer.world_size > 1:
            # DDP keeps parameters in step (averaged gradients) and broadcasts BatchNorm statistics from rank 0 at
            # each forward; after the epoch's last step they differ, so take rank 0's everywhere
            for buffer in self.module.buffers():
                torch.distributed.broadcast(buffer, src=0)
        if self.checkpointer is not None:
            self.checkpointer(self.trainer, self.current_epoch + 1)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Accumulate the per-cell negative ELBO (Lightning has put the networks in eval mode)."""
        args, kwargs = self.module._get_fn_args_from_batch(batch)
        n = int(args[0].shape[0])
        with pyro.validation_enabled(self.validate_distributions):
            loss = self.svi.vi_loss(*args, **kwargs)
        self._val_sum = self._add(self._val_sum, loss * n)
        self._n_val += n
        prior = self.module.prior
        if prior.n_components > 1 and hasattr(self.module, "latent_mean"):
            assign = prior.assign(self.module.latent_mean(*args, **kwargs), self.svi.pseudo_encoder)
            if self._val_used is None:
                self._val_used = torch.zeros(prior.n_components, dtype=torch.bool, device=assign.device)
            self._val_used[assign] = True

    def on_validation_epoch_end(self) -> None:
        if self._n_val:
            self.log("elbo_validation", float(self._val_sum) / self._n_val)
        if self._val_used is not None:
            self.log("utilized_clusters_validation", float(self._val_used.sum()), prog_bar=True)
        self._reset_val_accumulators()


def _all_ranks_agree(ok: bool) -> bool:
    """``True`` only if every data-parallel rank found its step finite (one all-reduce of a flag)."""
    flag = torch.tensor([0.0 if ok else 1.0])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() == 0.0)


def _fused(opt: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The same Adam (parameter groups, lr, betas, eps) with ``fused=True``; unchanged if torch refuses."""
    if opt is None or not isinstance(opt, torch.optim.Adam):
        return opt
    groups = [{**g, "fused": True, "foreach": None} for g in opt.param_groups]
    try:
        return torch.optim.Adam(groups, fused=True)
    except (RuntimeError, ValueError):
        return opt


def is_data_parallel(trainer_kwargs: dict) -> bool:
    """``True`` when ``trainer_kwargs`` ask for Lightning's DDP strategy."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer_kwargs.get("strategy")
    return isinstance(strategy, DDPStrategy) or (isinstance(strategy, str) and strategy.startswith("ddp"))


def ddp_strategy(strategy):
    """Lightning's DDP strategy for the alternating step.

    One training step runs two backward passes (VI, then EM) and each touches only part of the parameters (the EM
    loss never reaches the decoder), so DDP must look for unused parameters; gradients are then averaged over
    ranks in both passes and every rank applies the same Adam updates."""
    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(strategy, DDPStrategy):
        return strategy
    start_method = "spawn" if "spawn" in strategy else "popen"
    return DDPStrategy(find_unused_parameters=True, start_method=start_method)
