r"""The alternating inference of the VMM paper: one ELBO step, then one enumerated-EM step, per minibatch.

For a model module ``m`` (any ``torch.nn.Module`` with Pyro programs ``m.model(*args)`` / ``m.guide(*args)``, a
:class:`~pyro_vmm.priors.LatentPrior` at ``m.prior`` and, for priors with pseudo-inputs, ``m.pseudo_posterior(u)``
returning :math:`q_\phi(\mu \mid u)`), each step does

1. **VI step** on guide/network parameters :math:`\theta, \phi` with the prior parameters held fixed:
   minimise :math:`-\mathrm{ELBO}` (``TraceMeanField_ELBO``: analytic KL where registered, Monte Carlo otherwise);
2. **EM step** on the prior parameters only: draw :math:`z \sim q_\phi(z \mid x)` from the guide with the networks
   in eval mode and no gradient, then minimise the ``TraceEnum_ELBO`` loss of
   :meth:`~pyro_vmm.priors.LatentPrior.em_model`, which sums out the cluster variable :math:`c` by parallel
   enumeration and adds the hyperprior log-densities (all scaled by :math:`1/B`).

Two ``torch.optim.Adam`` optimisers own disjoint parameter sets (prior lr = ``lr * prior_lr_ratio``).  Gradients are
zeroed before each backward pass, so neither step leaks into the other's parameters.  Nothing here is specific to a
model: the same object drives the image VAE and scVI, on CPU or CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.elbo import ELBO

from .priors import LatentPrior
from .utils import eval_mode

__all__ = ["AlternatingSVI", "StepResult", "sample_latent"]


@contextmanager
def _frozen(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Build a graph with ``params`` treated as constants (``requires_grad`` restored on exit)."""
    frozen = [p for p in params if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


@contextmanager
def _validation(enabled: bool | None) -> Iterator[None]:
    """``pyro.validation_enabled(enabled)``, or nothing at all for ``None`` (the caller's setting stands)."""
    if enabled is None:
        yield
        return
    with pyro.validation_enabled(enabled):
        yield


class _SiteScale(poutine.messenger.Messenger):
    """Multiply the log-density scale of one sample site (in model and guide alike) by ``factor``."""

    def __init__(self, site: str, factor: float) -> None:
        super().__init__()
        self.site, self.factor = site, float(factor)

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["name"] == self.site:
            msg["scale"] = self.factor * msg["scale"]


def _empty_guide(*args, **kwargs) -> None:
    """The EM step has no guide: ``z`` is observed data and ``c`` is enumerated in the model."""


def sample_latent(module: torch.nn.Module, *args, latent_site: str = "z", **kwargs) -> torch.Tensor:
    """Draw ``z ~ q(z | x)`` by running ``module.guide`` in eval mode without gradient."""
    with torch.no_grad(), eval_mode(module):
        trace = poutine.trace(module.guide).get_trace(*args, **kwargs)
    if latent_site not in trace.nodes:
        raise KeyError(f"the guide has no sample site {latent_site!r}; set latent_site to the latent's site name")
    return trace.nodes[latent_site]["value"].detach()


@dataclass
class StepResult:
    """Losses of one alternating step (per datum, as floats)."""

    elbo_loss: float
    em_loss: float | None


class AlternatingSVI:
    """Alternate a VI step on networks with an enumerated-EM step on the prior (see module docstring).

    Parameters
    ----------
    module
        Holds ``model``, ``guide`` and ``prior`` (and ``pseudo_posterior`` for ``vmm``/``vampprior``).
    lr
        Adam learning rate of the VI step.
    prior_lr_ratio
        Learning rate of the EM step divided by ``lr``.
    adam_eps
        Adam epsilon for both optimisers (1e-7, Keras' default, as in the reference code).
    elbo
        ELBO of the VI step (default ``TraceMeanField_ELBO``).
    latent_site
        Name of the latent sample site in the guide.
    attach_responsibilities
        Use the reference code's EM objective (responsibilities left on the graph) instead of textbook EM.
    make_optimizers
        Build the two Adam optimisers (turn off when an outer loop, e.g. Lightning, owns them).
    validate_em
        Run Pyro's distribution validation in the EM step (off by default: it is library code, and costly).
    validate_vi
        Pyro's distribution validation in the VI step and :meth:`evaluate_loss`: ``None`` (default) leaves Pyro's
        global setting (on unless switched off), ``True``/``False`` force it.  Validation checks every site's
        parameters and values (e.g. that a ``scale_tril`` is lower-triangular with a positive diagonal) on every
        step; it changes no number, only the time (about 15 % of an MNIST step at batch 512).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        lr: float = 1e-3,
        prior_lr_ratio: float = 1.0,
        adam_eps: float = 1e-7,
        elbo: ELBO | None = None,
        latent_site: str = "z",
        attach_responsibilities: bool = False,
        make_optimizers: bool = True,
        validate_em: bool = False,
        validate_vi: bool | None = None,
    ) -> None:
        prior = getattr(module, "prior", None)
        if not isinstance(prior, LatentPrior):
            raise TypeError("module.prior must be a pyro_vmm.priors.LatentPrior (see pyro_vmm.build_prior)")
        if lr <= 0 or prior_lr_ratio < 0:
            raise ValueError(f"need lr > 0 and prior_lr_ratio >= 0, got lr={lr}, prior_lr_ratio={prior_lr_ratio}")
        self.module = module
        self.prior = prior
        self.lr = float(lr)
        self.prior_lr_ratio = float(prior_lr_ratio)
        self.adam_eps = float(adam_eps)
        self.latent_site = latent_site
        self.attach_responsibilities = attach_responsibilities
        self.validate_em = validate_em
        self.validate_vi = validate_vi
        self.elbo = elbo if elbo is not None else TraceMeanField_ELBO()
        self.em_elbo = TraceEnum_ELBO(max_plate_nesting=1)
        self.optimizers = self.build_optimizers() if make_optimizers else None

    # -- parameter ownership -----------------------------------------------------------------------------------
    def em_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.prior.em_parameters())

    def vi_parameters(self) -> list[torch.nn.Parameter]:
        em_ids = {id(p) for p in self.em_parameters()}
        return [p for p in self.module.parameters() if id(p) not in em_ids and p.requires_grad]

    def build_optimizers(self) -> tuple[torch.optim.Optimizer | None, torch.optim.Optimizer | None]:
        """``(vi_optimizer, em_optimizer)``; either is ``None`` when it would own no parameter."""
        vi_params = self.vi_parameters()
        vi = torch.optim.Adam(vi_params, lr=self.lr, eps=self.adam_eps) if vi_params else None
        em_params = self.em_parameters()
        em = (
            torch.optim.Adam(em_params, lr=self.lr * self.prior_lr_ratio, eps=self.adam_eps) if em_params else None
        )
        return vi, em

    @property
    def pseudo_encoder(self) -> Callable | None:
        return getattr(self.module, "pseudo_posterior", None) if self.prior.uses_encoder else None

    # -- losses ---------------------------------------------------------------------------------------------------
    def vi_loss(self, *args, kl_weight: float = 1.0, **kwargs) -> torch.Tensor:
        r"""Differentiable negative ELBO of the minibatch (as scaled by the model, e.g. a batch mean).

        ``kl_weight`` :math:`\beta` scales the latent site in model and guide alike, so the loss is
        :math:`-\mathbb E_q \log p(x \mid z) + \beta\,\mathrm{KL}(q(z \mid x) \,\|\, p(z))` (KL warm-up; 1 is the ELBO).

        The graph is built with the EM parameters frozen (``requires_grad=False``): the VI step never updates them,
        so their gradients (for the VMM a backward pass through the encoder into the pseudo-inputs) are not computed.
        """
        model, guide = self.module.model, self.module.guide
        if kl_weight != 1.0:
            model = _SiteScale(self.latent_site, kl_weight)(model)
            guide = _SiteScale(self.latent_site, kl_weight)(guide)
        with _frozen(self.em_parameters()), _validation(self.validate_vi):
            return self.elbo.differentiable_loss(model, guide, *args, **kwargs)

    def em_loss(self, *args, **kwargs) -> torch.Tensor:
        """Differentiable EM loss: ``TraceEnum_ELBO`` of ``prior.em_model`` at ``z ~ q(z|x)`` (no gradient to z)."""
        z = sample_latent(self.module, *args, latent_site=self.latent_site, **kwargs)
        return self.em_loss_at(z)

    def em_loss_at(self, z: torch.Tensor) -> torch.Tensor:
        """EM loss at given latent samples ``z`` (B, D).

        Pyro's distribution validation is switched off here: the EM program is fixed library code whose sites are
        checked by the test-suite, and validation roughly doubles the cost of this small step.
        """
        return self.em_loss_and_assignments_at(z, assignments=False)[0]

    def em_loss_and_assignments_at(
        self, z: torch.Tensor, assignments: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""EM loss at ``z`` and (if asked) the hard assignments :math:`\arg\max_k q(c=k \mid z_n)` from the same
        mixture parameters -- one pseudo-input encoder pass for both, as the training loop needs to count the
        clusters in use."""
        with _frozen(self.vi_parameters()):  # the networks are fixed here: no weight gradients through the encoder
            return self._em_loss_and_assignments_at(z, assignments)

    def _em_loss_and_assignments_at(
        self, z: torch.Tensor, assignments: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        params = self.prior.mixture_params(self.pseudo_encoder) if hasattr(self.prior, "mixture_params") else None
        with pyro.validation_enabled(self.validate_em):
            if params is None:
                loss = self.em_elbo.differentiable_loss(
                    self.prior.em_model, _empty_guide, z, self.pseudo_encoder, self.attach_responsibilities
                )
            else:
                loss = self.em_elbo.differentiable_loss(
                    self.prior.em_model, _empty_guide, z, self.pseudo_encoder, self.attach_responsibilities, params
                )
        assign = None
        if assignments:
            with torch.no_grad():
                if params is None:
                    assign = self.prior.assign(z, self.pseudo_encoder)
                else:
                    assign = self.prior.cluster_logits(z, params=params.detach()).argmax(-1)
        return loss, assign

    # -- one alternating step ---------------------------------------------------------------------------------------
    def _optimizers(self) -> tuple[torch.optim.Optimizer | None, torch.optim.Optimizer | None]:
        if self.optimizers is None:
            raise RuntimeError("built with make_optimizers=False: drive vi_loss/em_loss from your own loop")
        return self.optimizers

    def _vi_optimizer(self) -> torch.optim.Optimizer:
        vi_opt, _ = self._optimizers()
        if vi_opt is None:
            raise RuntimeError("the module has no network parameters for the VI step")
        return vi_opt

    def _update(
        self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, backward: Callable | None = None
    ) -> torch.Tensor:
        """Gradients of ``loss`` (by ``backward``, default ``loss.backward()``), one step of ``optimizer``, gradients
        cleared before and after; returns the detached loss."""
        self.module.zero_grad(set_to_none=True)
        (backward or torch.Tensor.backward)(loss)
        optimizer.step()
        self.module.zero_grad(set_to_none=True)
        return loss.detach()

    def vi_step(self, *args, **kwargs) -> float:
        """One Adam step of the VI optimiser on the negative ELBO; returns the loss."""
        return float(self._update(self._vi_optimizer(), self.vi_loss(*args, **kwargs)))

    def em_step(self, *args, **kwargs) -> float | None:
        """One Adam step of the EM optimiser on the enumerated EM loss; ``None`` if the prior has nothing to fit."""
        _, em_opt = self._optimizers()
        return None if em_opt is None else float(self._update(em_opt, self.em_loss(*args, **kwargs)))

    def em_step_at(self, z: torch.Tensor) -> float | None:
        """One EM step at fixed latent samples ``z`` (e.g. to fit the prior alone)."""
        _, em_opt = self._optimizers()
        return None if em_opt is None else float(self._update(em_opt, self.em_loss_at(z)))

    def alternating_step(
        self,
        vi_opt: torch.optim.Optimizer,
        em_opt: torch.optim.Optimizer | None,
        *args,
        kl_weight: float = 1.0,
        backward: Callable | None = None,
        assignments: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One VI step (networks; prior parameters fixed) then, with ``em_opt``, one EM step (prior parameters;
        networks fixed) on the same minibatch with the updated encoder: the step every training loop runs.

        ``backward`` computes the gradients (e.g. Lightning's ``manual_backward``); ``assignments`` also returns the
        hard assignments from the EM step's own pseudo-input pass.  Returns ``(vi_loss, em_loss, assignments)``,
        detached (``None`` where not computed)."""
        vi_loss = self._update(vi_opt, self.vi_loss(*args, kl_weight=kl_weight, **kwargs), backward)
        em_loss = assign = None
        if em_opt is not None:
            z = sample_latent(self.module, *args, latent_site=self.latent_site, **kwargs)
            loss, assign = self.em_loss_and_assignments_at(z, assignments=assignments)
            em_loss = self._update(em_opt, loss, backward)
        return vi_loss, em_loss, assign

    def step(self, *args, **kwargs) -> StepResult:
        """One VI step then (for GMM/VMM) one EM step, on the same minibatch (:meth:`alternating_step`)."""
        vi_loss, em_loss, _ = self.alternating_step(self._vi_optimizer(), self._optimizers()[1], *args, **kwargs)
        return StepResult(float(vi_loss), None if em_loss is None else float(em_loss))

    @torch.no_grad()
    def evaluate_loss(self, *args, **kwargs) -> float:
        """Negative ELBO without a parameter update (networks in eval mode)."""
        with eval_mode(self.module):
            return float(self.vi_loss(*args, **kwargs))

    def state_dict(self) -> dict:
        if self.optimizers is None:
            return {}
        vi, em = self.optimizers
        return {"vi": vi.state_dict() if vi is not None else None, "em": em.state_dict() if em is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizers is None or not state:
            return
        vi, em = self.optimizers
        if vi is not None and state.get("vi") is not None:
            vi.load_state_dict(state["vi"])
        if em is not None and state.get("em") is not None:
            em.load_state_dict(state["em"])

