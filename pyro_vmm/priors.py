r"""The four latent priors of pyro-vmm, as Pyro programs (math only, no I/O).

Notation follows Stirn & Knowles (2024), "The VampPrior Mixture Model": ``D`` latent dimensions, ``K`` components
(an upper bound on the number of clusters), ``B`` cells/images in the current minibatch.

``normal``
    :math:`p(z) = \mathcal N(0, I)`.
``vampprior``
    :math:`p(z) = \frac1K\sum_k q_\phi(z \mid u_k)`, pseudo-inputs :math:`u_k` trained with the encoder (VI step).
``gmm``
    truncated DP-GMM fitted by MAP-EM:

    .. math::
        \alpha \sim \mathrm{Gamma}(1, 1),\quad \pi \sim \mathrm{Dir}\big(\tfrac{1}{K\alpha}\mathbf 1_K\big),\quad
        \mu_k \sim \mathcal N(0, I),\quad \Lambda_k = L_k L_k^\top \sim \mathcal W\big(D+2, \tfrac{K^{2/D}}{D+2} I\big),\\
        c \sim \mathrm{Cat}(\pi),\quad z \mid c \sim \mathcal N(\mu_c, \Lambda_c^{-1}).
``vmm``
    as ``gmm`` but :math:`\mu_k \sim q_\phi(\mu \mid u_k) = \mathcal N(m_k, S_k)` (VampPrior pseudo-inputs pushed
    through the encoder).  The ELBO uses the predictive components :math:`\mathcal N(m_k, \Lambda_k^{-1} + S_k)`;
    the EM step and cluster assignment use the expected log-likelihood

    .. math::
        \ell_k(z) = \mathbb E_{q(\mu_k|u_k)} \log \mathcal N(z \mid \mu_k, \Lambda_k^{-1})
                  = \log \mathcal N(z \mid m_k, \Lambda_k^{-1}) - \tfrac12 \operatorname{tr}(\Lambda_k S_k),

    and the mean hyperprior enters in expectation,
    :math:`\mathbb E_q \log \mathcal N(\mu_k|0,I) = -\tfrac D2\log 2\pi - \tfrac12\|m_k\|^2 - \tfrac12\operatorname{tr} S_k`.

Every prior exposes

* :meth:`LatentPrior.latent_dist` -- the distribution of the ``z`` site in a model's Pyro program (ELBO step);
* :meth:`LatentPrior.em_model` -- the Pyro program of the EM step (cluster variable ``c`` enumerated in parallel,
  hyperpriors as observed/factor sites, everything scaled by ``1/B`` as in the paper);
* :meth:`LatentPrior.cluster_probs` -- :math:`q(c \mid z)`.

Prior parameters are :class:`pyro.nn.PyroParam` attributes (constrained MAP parameters), so they live in the
module's ``state_dict``, save/load and move devices with it.  Encoders are *not* owned by a prior: priors that need
pseudo-input posteriors take ``encoder``, a callable ``u -> q(mu | u)`` supplied by the model at call time.
The densities they are built from (hyperprior log-densities, :math:`\ell_k`, the mixture of the ``z`` site) are in
:mod:`pyro_vmm.mixtures`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from pyro.ops.indexing import Vindex
from torch import Tensor

from pyro_vmm.mixtures import (
    MixtureParams,
    _mean_cov,
    dirichlet_log_prob_logits,
    expected_normal_log_prob,
    gaussian_expected_log_lik,
    wishart_log_prob_cholesky,
)

__all__ = [
    "PRIORS",
    "GaussianMixturePrior",
    "LatentPrior",
    "PseudoEncoder",
    "StandardNormalPrior",
    "VampPrior",
    "VampPriorMixture",
    "build_prior",
]

#: diagonal shift added to the precision Cholesky factors (the reference's FillScaleTriL default)
DIAG_SHIFT = 1e-5

#: ``u -> q(mu | u)``: a distribution with batch shape ``(K,)`` and event shape ``(D,)``
PseudoEncoder = Callable[[Tensor], torch.distributions.Distribution]
Inference = Literal["map-dp", "map", "mle"]


# ----------------------------------------------------------------------------------------------------------------
# Priors
# ----------------------------------------------------------------------------------------------------------------
class LatentPrior(PyroModule):
    """Base class: a prior over the ``D``-dimensional latent ``z`` with ``K`` components."""

    name: str = ""

    def __init__(self, n_latent: int, n_components: int) -> None:
        super().__init__()
        if int(n_latent) < 1:
            raise ValueError(f"n_latent must be >= 1, got {n_latent}; pass a positive latent dimension.")
        if int(n_components) < 1:
            raise ValueError(f"n_components (K) must be >= 1, got {n_components}; pass K >= 1.")
        self.n_latent = int(n_latent)
        self.n_components = int(n_components)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # carries device and dtype

    # -- the two Pyro programs ----------------------------------------------------------------------------------
    def latent_dist(self, encoder: PseudoEncoder | None = None) -> torch.distributions.Distribution:
        """The marginal prior p(z) used at the model's ``z`` site (batch shape ``()``, event ``(D,)``)."""
        raise NotImplementedError

    def em_model(self, z: Tensor, encoder: PseudoEncoder | None = None) -> None:
        """Pyro program of the empirical-Bayes step (default: nothing to fit)."""

    # -- clustering ----------------------------------------------------------------------------------------------
    def cluster_logits(self, z: Tensor, encoder: PseudoEncoder | None = None) -> Tensor:
        """Unnormalised log q(c = k | z), shape ``z.shape[:-1] + (K,)``."""
        return z.new_zeros(z.shape[:-1] + (self.n_components,))

    def cluster_probs(self, z: Tensor, encoder: PseudoEncoder | None = None) -> Tensor:
        """Responsibilities q(c | z), rows sum to 1."""
        return torch.softmax(self.cluster_logits(z, encoder), dim=-1)

    def assign(self, z: Tensor, encoder: PseudoEncoder | None = None) -> Tensor:
        """Hard assignments argmax_k q(c = k | z)."""
        return self.cluster_logits(z, encoder).argmax(-1)

    # -- parameter ownership -------------------------------------------------------------------------------------
    @property
    def has_em_step(self) -> bool:
        return any(True for _ in self.em_parameters())

    def em_parameters(self) -> Iterator[torch.nn.Parameter]:
        """Parameters fitted by the EM step (all others belong to the VI step)."""
        return iter(())

    @property
    def uses_encoder(self) -> bool:
        """True when the prior needs the pseudo-input encoder ``u -> q(mu | u)``."""
        return False

    def extra_repr(self) -> str:
        return f"D={self.n_latent}, K={self.n_components}"


class StandardNormalPrior(LatentPrior):
    r""":math:`p(z) = \mathcal N(0, I)`; one "cluster"."""

    name = "normal"

    def __init__(self, n_latent: int, n_components: int = 1) -> None:
        super().__init__(n_latent, 1)

    def latent_dist(self, encoder: PseudoEncoder | None = None) -> torch.distributions.Distribution:
        zero = self._anchor.expand(self.n_latent)
        return dist.Normal(zero, torch.ones_like(zero)).to_event(1)


class VampPrior(LatentPrior):
    r""":math:`p(z) = \frac1K \sum_k q_\phi(z \mid u_k)`; pseudo-inputs are trained by the VI step."""

    name = "vampprior"

    def __init__(self, n_latent: int, n_components: int, pseudo_inputs: Tensor) -> None:
        super().__init__(n_latent, n_components)
        _check_pseudo_inputs(pseudo_inputs, n_components)
        self.pseudo_inputs = PyroParam(_as_float(pseudo_inputs))

    @property
    def uses_encoder(self) -> bool:
        return True

    def _components(self, encoder: PseudoEncoder | None) -> torch.distributions.Distribution:
        if encoder is None:
            raise ValueError("the VampPrior needs the pseudo-input encoder: pass encoder=model.pseudo_posterior")
        return encoder(self.pseudo_inputs)

    def latent_dist(self, encoder: PseudoEncoder | None = None) -> torch.distributions.Distribution:
        comps = self._components(encoder)
        logits = self._anchor.new_zeros(self.n_components)
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), comps)

    def cluster_logits(self, z: Tensor, encoder: PseudoEncoder | None = None) -> Tensor:
        return self._components(encoder).log_prob(z.unsqueeze(-2))


class _MixturePrior(LatentPrior):
    """Shared parts of the GMM and the VMM: weights, precisions, concentration and the EM program."""

    def __init__(self, n_latent: int, n_components: int, inference: Inference = "map-dp") -> None:
        super().__init__(n_latent, n_components)
        if inference not in ("map-dp", "map", "mle"):
            raise ValueError(f"inference must be 'map-dp', 'map' or 'mle', got {inference!r}")
        self.inference = inference
        k, d = self.n_components, self.n_latent
        self.logits = PyroParam(torch.zeros(k))
        self.prec_tril_raw = PyroParam(
            torch.eye(d).expand(k, d, d).clone(), constraint=constraints.softplus_lower_cholesky
        )
        self.alpha = PyroParam(torch.tensor(1.0), constraint=constraints.softplus_positive)

    # constants of the hyperpriors
    @property
    def wishart_df(self) -> float:
        return self.n_latent + 2.0

    @property
    def wishart_scale(self) -> float:
        """v in V = v I: K^{2/D} / (D + 2), so that E[Lambda_k] = K^{2/D} I."""
        return self.n_components ** (2.0 / self.n_latent) / (self.n_latent + 2.0)

    @property
    def prec_tril(self) -> Tensor:
        """L_k, lower-triangular with positive diagonal (softplus + 1e-5)."""
        eye = torch.eye(self.n_latent, device=self._anchor.device, dtype=self._anchor.dtype)
        return self.prec_tril_raw + DIAG_SHIFT * eye

    def em_parameters(self) -> Iterator[torch.nn.Parameter]:
        names = ["logits_unconstrained", "prec_tril_raw_unconstrained", *self._mean_parameter_names()]
        if self.inference == "map-dp":
            names.append("alpha_unconstrained")
        return (getattr(self, n) for n in names)

    def _mean_parameter_names(self) -> list[str]:
        raise NotImplementedError

    def mixture_params(self, encoder: PseudoEncoder | None = None) -> MixtureParams:
        raise NotImplementedError

    def mean_hyperprior(self, params: MixtureParams) -> None:
        """Pyro sites of the hyperprior on the component means."""
        raise NotImplementedError

    # -- ELBO step -----------------------------------------------------------------------------------------------
    def latent_dist(self, encoder: PseudoEncoder | None = None) -> torch.distributions.Distribution:
        p = self.mixture_params(encoder)
        return p.predictive_mixture()

    # -- EM step ----------------------------------------------------------------------------------------------------
    def hyperprior(self, params: MixtureParams) -> None:
        """Hyperprior sites: alpha ~ Gamma(1,1) (MAP-DP), pi ~ Dir(1/(K alpha)), Lambda_k ~ W, mean prior."""
        if self.inference == "mle":
            return
        k = self.n_components
        alpha = self.alpha
        if self.inference == "map-dp":
            pyro.sample("alpha", dist.Gamma(alpha.new_tensor(1.0), alpha.new_tensor(1.0)), obs=alpha)
        else:
            alpha = alpha.detach()
        pyro.factor("pi", dirichlet_log_prob_logits(params.log_pi, 1.0 / (k * alpha)))
        pyro.factor("precision", wishart_log_prob_cholesky(params.prec_tril, self.wishart_df, self.wishart_scale).sum())
        self.mean_hyperprior(params)

    def em_model(
        self,
        z: Tensor,
        encoder: PseudoEncoder | None = None,
        attach_responsibilities: bool = False,
        params: MixtureParams | None = None,
    ) -> None:
        r"""Generative program of the EM step, for ``TraceEnum_ELBO`` (``max_plate_nesting=1``).

        Given ``z`` (B, D) drawn from the guide without gradient, the enumerated loss is

        .. math:: -\frac1B\Big[\sum_n \log\sum_k \pi_k e^{\ell_{nk}} + \log p(\alpha) + \log p(\pi\mid\alpha)
                  + \sum_k \log p(\Lambda_k) + \sum_k \log p(\mu_k)\Big],

        whose gradient is the EM gradient (responsibilities held fixed).  ``attach_responsibilities=True`` adds
        :math:`\sum_n \sum_k r_{nk}\log r_{nk}` and reproduces the reference code's objective
        :math:`\sum_n\sum_k r_{nk}(\ell_{nk} + \log\pi_k)` with :math:`r` left on the graph.
        ``params`` (from :meth:`mixture_params`, still on the autograd graph) saves a second pseudo-input pass when
        the caller also needs them, e.g. to track cluster use.
        """
        if params is None:
            params = self.mixture_params(encoder)
        b = z.shape[0]
        with poutine.scale(scale=1.0 / b):
            self.hyperprior(params)
            ell = gaussian_expected_log_lik(z, params.loc, params.prec_tril, params.loc_cov)  # (B, K)
            with pyro.plate("data", b):
                c = pyro.sample("c", dist.Categorical(logits=params.log_pi), infer={"enumerate": "parallel"})
                pyro.factor("z_given_c", Vindex(ell)[..., c])
                if attach_responsibilities:
                    r = torch.softmax(ell + params.log_pi, -1)
                    pyro.factor("neg_entropy", (r * r.clamp_min(1e-30).log()).sum(-1))

    def cluster_logits(
        self, z: Tensor, encoder: PseudoEncoder | None = None, params: MixtureParams | None = None
    ) -> Tensor:
        r""":math:`\ell_{nk} + \log\pi_k` (the VMM's expected form); ``params`` skips recomputing them."""
        p = self.mixture_params(encoder) if params is None else params
        return gaussian_expected_log_lik(z, p.loc, p.prec_tril, p.loc_cov) + p.log_pi

    # -- merge moves (between EM steps) -----------------------------------------------------------------------------
    @torch.no_grad()
    def merge_components(self, cluster_of: Tensor) -> None:
        r"""A merge move on the mixture weights: ``cluster_of`` (K,) gives each component's cluster, ``-1`` for one
        that is dropped.  In each cluster :math:`G` the component of largest weight takes the group's weight,
        :math:`\pi_{k^*} \leftarrow \sum_{k \in G}\pi_k`; the others and the dropped ones get
        :math:`\pi_k = e^{-30}\max_j \pi_j` (the weights are renormalised by the softmax).

        A component left with (nearly) no weight stays so: the Dirichlet term
        :math:`(\tfrac{1}{K\alpha} - 1)\log\pi_k` of the EM loss pushes its logit further down, and its cells' data term
        gives it no responsibility to grow back from.  So the cells of a merged group are pulled, by the KL term of
        the ELBO, towards one component, whose mean and precision the next EM steps fit to the whole group."""
        cluster_of = torch.as_tensor(cluster_of, dtype=torch.long, device=self.logits.device).reshape(-1)
        if cluster_of.shape != (self.n_components,):
            raise ValueError(
                f"cluster_of must have one entry per component ({self.n_components}), got {tuple(cluster_of.shape)}"
            )
        if not (cluster_of >= 0).any():
            raise ValueError("cluster_of drops every component; keep at least one (an entry >= 0)")
        log_pi = torch.log_softmax(self.logits, -1)
        new = torch.full_like(log_pi, float(log_pi.max()) - 30.0)
        for c in torch.unique(cluster_of[cluster_of >= 0]):
            group = torch.nonzero(cluster_of == c).squeeze(-1)
            new[group[log_pi[group].argmax()]] = torch.logsumexp(log_pi[group], 0)
        self.logits = new - new.max()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, inference={self.inference!r}"


class GaussianMixturePrior(_MixturePrior):
    r"""Truncated DP-GMM: free means :math:`\mu_k \sim \mathcal N(0, I)` (initialised from the prior)."""

    name = "gmm"

    def __init__(self, n_latent: int, n_components: int, inference: Inference = "map-dp") -> None:
        super().__init__(n_latent, n_components, inference)
        self.loc = PyroParam(torch.randn(self.n_components, self.n_latent))

    def _mean_parameter_names(self) -> list[str]:
        return ["loc_unconstrained"]

    def mixture_params(self, encoder: PseudoEncoder | None = None) -> MixtureParams:
        return MixtureParams(torch.log_softmax(self.logits, -1), self.loc, self.prec_tril)

    def mean_hyperprior(self, params: MixtureParams) -> None:
        zero = torch.zeros_like(params.loc)
        pyro.sample("mu", dist.Normal(zero, torch.ones_like(zero)).to_event(2), obs=params.loc)


class VampPriorMixture(_MixturePrior):
    r"""The VMM: means :math:`\mu_k \sim q_\phi(\mu \mid u_k)` with pseudo-inputs :math:`u_k` fitted by EM."""

    name = "vmm"

    def __init__(
        self, n_latent: int, n_components: int, pseudo_inputs: Tensor, inference: Inference = "map-dp"
    ) -> None:
        super().__init__(n_latent, n_components, inference)
        _check_pseudo_inputs(pseudo_inputs, n_components)
        self.pseudo_inputs = PyroParam(_as_float(pseudo_inputs))

    @property
    def uses_encoder(self) -> bool:
        return True

    def _mean_parameter_names(self) -> list[str]:
        return ["pseudo_inputs_unconstrained"]

    def mixture_params(self, encoder: PseudoEncoder | None = None) -> MixtureParams:
        if encoder is None:
            raise ValueError("the VMM needs the pseudo-input encoder: pass encoder=model.pseudo_posterior")
        q = encoder(self.pseudo_inputs)
        loc, cov = _mean_cov(q)
        if loc.shape != (self.n_components, self.n_latent):
            raise ValueError(
                f"encoder(pseudo_inputs) has mean shape {tuple(loc.shape)}, expected ({self.n_components}, "
                f"{self.n_latent}); the encoder's latent size must equal n_latent"
            )
        return MixtureParams(torch.log_softmax(self.logits, -1), loc, self.prec_tril, cov)

    def mean_hyperprior(self, params: MixtureParams) -> None:
        assert params.loc_cov is not None
        pyro.factor("mu", expected_normal_log_prob(params.loc, params.loc_cov).sum())


def _as_float(x: Tensor) -> Tensor:
    x = x.detach().clone()
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _check_pseudo_inputs(pseudo_inputs: Tensor | None, n_components: int) -> None:
    if pseudo_inputs is None:
        raise ValueError("this prior needs pseudo_inputs: a tensor of shape (K, ...) in the encoder's input space")
    if pseudo_inputs.shape[0] != n_components:
        raise ValueError(f"pseudo_inputs has {pseudo_inputs.shape[0]} rows but K = {n_components}")


PRIORS: dict[str, type[LatentPrior]] = {
    "normal": StandardNormalPrior,
    "vampprior": VampPrior,
    "gmm": GaussianMixturePrior,
    "vmm": VampPriorMixture,
}


def build_prior(
    name: str,
    n_latent: int,
    n_components: int = 100,
    pseudo_inputs: Tensor | None = None,
    inference: Inference = "map-dp",
) -> LatentPrior:
    """Build a prior by name: ``'normal' | 'vampprior' | 'gmm' | 'vmm'``.

    ``pseudo_inputs`` (K, ...) are required by ``vampprior`` and ``vmm`` (initial values in the encoder's raw input
    parameterisation); ``inference`` applies to ``gmm`` and ``vmm``.
    """
    key = name.lower()
    if key not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of {sorted(PRIORS)}")
    if key == "normal":
        return StandardNormalPrior(n_latent)
    if key == "vampprior":
        return VampPrior(n_latent, n_components, pseudo_inputs)  # type: ignore[arg-type]
    if key == "gmm":
        return GaussianMixturePrior(n_latent, n_components, inference)
    return VampPriorMixture(n_latent, n_components, pseudo_inputs, inference)  # type: ignore[arg-type]
