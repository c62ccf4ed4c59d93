r"""Lightning training plan of VMM-scVI: the alternating VI / EM step of :class:`~pyro_vmm.infer.AlternatingSVI`.

Per minibatch (manual optimisation, two torch Adam optimisers with disjoint parameters):

1. VI step on the networks (and, for ``vampprior``, the pseudo-inputs): zero all gradients,
   ``loss = svi.vi_loss(*args)`` (batch mean of :math:`-\mathrm{ELBO}_n`), backward, VI Adam step;
2. EM step on the prior parameters (``gmm``/``vmm`` only): zero all gradients, draw :math:`z \sim q(z|x)` with the
   networks in eval mode and no gradient, ``svi.em_loss_at(z)`` (identical to ``svi.em_loss(*args)``, which does
   exactly these two things), backward, EM Adam step.

Gradients are zeroed (set to ``None``) before each backward pass, so neither optimiser sees the other loss's
gradients.  The EM optimiser is stepped unwrapped, so ``trainer.global_step`` counts minibatches (``max_steps`` means
minibatches), not optimiser steps.  The two optimisers are ``AlternatingSVI.build_optimizers()``'s, rebuilt with
``fused=True`` (same update, one kernel; 4x cheaper on CPU) where torch supports it.  No KL warm-up (the paper has
none).

Logged once per epoch, as Python floats: ``elbo_train`` (mean per-cell negative ELBO over the epoch),
``em_loss_train`` (mean EM loss) and, on validation epochs, ``elbo_validation`` (networks in eval mode; scvi-tools'
early stopping monitors it) and ``utilized_clusters_validation`` (number of components that are
:math:`\arg\max_k q(c=k|z)` of at least one validation cell, z the posterior mean, as in the final evaluation).
``track_utilized_clusters=True`` adds ``utilized_clusters_train``, the reference's per-epoch count over training
cells (z the EM-step samples), at the cost of one more pass of the pseudo-inputs through the encoder per step.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pyro
import torch
from torch import Tensor

from .infer import AlternatingSVI, sample_latent

__all__ = ["VMMTrainingPlan"]


class VMMTrainingPlan(pl.LightningModule):
    """Train a Pyro scVI module (``model``/``guide``/``prior``) with the alternating VI / EM steps.

    Parameters
    ----------
    module
        A :class:`~pyro_vmm.models.scvi.VMMSCVIModule` (or any module meeting :class:`AlternatingSVI`'s contract that
        also has ``_get_fn_args_from_batch``).
    lr
        Adam learning rate of the VI step.
    prior_lr_ratio
        EM learning rate divided by ``lr``.
    adam_eps
        Adam epsilon of both optimisers (1e-7, Keras' default, as the reference code).
    attach_responsibilities
        Use the reference code's EM objective (responsibilities left on the graph).
    track_utilized_clusters
        Also log ``utilized_clusters_train`` (one extra cluster assignment per step, no host sync).
    fused_adam
        Rebuild both Adam optimisers with ``fused=True`` (falls back to the plain ones where unsupported).
    validate_distributions
        Keep Pyro's distribution argument/support checks on during training (off by default: the counts were checked
        by ``setup_anndata``, and the checks cost ~5% of a step).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        lr: float = 1e-3,
        prior_lr_ratio: float = 1.0,
        adam_eps: float = 1e-7,
        attach_responsibilities: bool = False,
        track_utilized_clusters: bool = False,
        validate_distributions: bool = False,
        fused_adam: bool = True,
    ) -> None:
        super().__init__()
        self.module = module
        self.svi = AlternatingSVI(
            module,
            lr=lr,
            prior_lr_ratio=prior_lr_ratio,
            adam_eps=adam_eps,
            attach_responsibilities=attach_responsibilities,
            make_optimizers=False,
        )
        self.automatic_optimization = False
        self.track_utilized_clusters = track_utilized_clusters
        self.validate_distributions = validate_distributions
        self.fused_adam = fused_adam
        self.n_obs_training: int | None = None  # set by scvi's TrainRunner
        self.n_obs_validation: int | None = None
        self._reset_train_accumulators()
        self._reset_val_accumulators()

    # ---------------------------------------------------------------------------------------------- optimisers
    @property
    def has_em_step(self) -> bool:
        return self.module.prior.has_em_step

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        vi, em = self.svi.build_optimizers()
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
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        with pyro.validation_enabled(self.validate_distributions):
            self._alternating_step(batch)

    def _alternating_step(self, batch: dict[str, Tensor]) -> None:
        args, kwargs = self.module._get_fn_args_from_batch(batch)
        n = int(args[0].shape[0])
        (vi_opt, *_), (_, *raw_rest) = self._optimizer_list()

        # 1. VI step (networks; prior parameters fixed)
        self.module.zero_grad(set_to_none=True)
        vi_loss = self.svi.vi_loss(*args, **kwargs)
        self.manual_backward(vi_loss)
        vi_opt.step()
        self._elbo_sum = self._add(self._elbo_sum, vi_loss * n)
        self._n_train += n

        # 2. EM step (prior parameters; networks fixed), same minibatch, updated encoder
        if raw_rest:
            em_opt = raw_rest[0]
            self.module.zero_grad(set_to_none=True)
            z = sample_latent(self.module, *args, latent_site=self.svi.latent_site, **kwargs)
            em_loss = self.svi.em_loss_at(z)
            self.manual_backward(em_loss)
            em_opt.step()
            self._em_sum = self._add(self._em_sum, em_loss * n)
            self._n_em += n
            if self.track_utilized_clusters:
                self._track_clusters(z)
        self.module.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _track_clusters(self, z: Tensor) -> None:
        prior = self.module.prior
        assign = prior.assign(z, self.svi.pseudo_encoder)
        if self._used is None:
            self._used = torch.zeros(prior.n_components, dtype=torch.bool, device=z.device)
        self._used[assign] = True

    def on_train_epoch_end(self) -> None:
        if self._n_train:
            self.log("elbo_train", float(self._elbo_sum) / self._n_train)
        if self._n_em:
            self.log("em_loss_train", float(self._em_sum) / self._n_em)
        if self._used is not None:
            self.log("utilized_clusters_train", float(self._used.sum()))
        self._reset_train_accumulators()

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
            self.log("utilized_clusters_validation", float(self._val_used.sum()))
        self._reset_val_accumulators()


def _fused(opt: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The same Adam (parameter groups, lr, betas, eps) with ``fused=True``; unchanged if torch refuses."""
    if opt is None or not isinstance(opt, torch.optim.Adam):
        return opt
    groups = [{**g, "fused": True, "foreach": None} for g in opt.param_groups]
    try:
        return torch.optim.Adam(groups, fused=True)
    except (RuntimeError, ValueError):
        return opt
