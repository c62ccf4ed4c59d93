r"""The Gaussian-mixture math under the latent priors of :mod:`pyro_vmm.priors` (math only, no I/O): the hyperprior
log-densities of the DP-GMM / VMM, the expected Gaussian log-likelihood :math:`\ell_k(z)`, the mixture distribution
of the ``z`` site and the mixture parameters of one EM step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor

__all__ = [
    "GaussianMixture",
    "MixtureParams",
    "dirichlet_log_prob_logits",
    "expected_normal_log_prob",
    "gaussian_expected_log_lik",
    "wishart_log_prob_cholesky",
]

LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------------------------
# Hyperprior log-densities (exact, normalised; evaluated in the parameterisation used, without Jacobians)
# ----------------------------------------------------------------------------------------------------------------
def dirichlet_log_prob_logits(log_pi: Tensor, concentration: Tensor | float) -> Tensor:
    r""":math:`\log \mathrm{Dir}(\pi \mid c \mathbf 1_K)` evaluated from :math:`\log \pi` (stable when some
    :math:`\pi_k` underflow):  :math:`\sum_k (c-1)\log\pi_k + \log\Gamma(Kc) - K\log\Gamma(c)`."""
    k = log_pi.shape[-1]
    c = torch.as_tensor(concentration, dtype=log_pi.dtype, device=log_pi.device)
    return ((c - 1.0) * log_pi).sum(-1) + torch.lgamma(k * c) - k * torch.lgamma(c)


def wishart_log_prob_cholesky(prec_tril: Tensor, df: float, scale: float) -> Tensor:
    r""":math:`\log \mathcal W(\Lambda \mid \nu, V=vI)` at :math:`\Lambda = LL^\top`, per leading index.

    .. math:: \tfrac{\nu-D-1}2 \log|\Lambda| - \tfrac1{2v}\operatorname{tr}\Lambda
              - \tfrac{\nu D}2 \log(2v) - \log\Gamma_D(\tfrac\nu2)

    with :math:`\log|\Lambda| = 2\sum_i \log L_{ii}` and :math:`\operatorname{tr}\Lambda = \|L\|_F^2`.
    The density is that of the matrix :math:`\Lambda` (no Cholesky Jacobian), as in the reference code."""
    d = prec_tril.shape[-1]
    log_det = 2.0 * prec_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    trace = prec_tril.pow(2).sum((-2, -1))
    log_norm = 0.5 * df * d * math.log(2.0 * scale) + _multigammaln(0.5 * df, d)
    return 0.5 * (df - d - 1.0) * log_det - 0.5 * trace / scale - log_norm


@functools.lru_cache(maxsize=64)
def _multigammaln(a: float, d: int) -> float:
    """log Gamma_d(a), cached: the Wishart normaliser is a constant of (df, D)."""
    return float(torch.special.multigammaln(torch.tensor(a, dtype=torch.float64), d))


def expected_normal_log_prob(loc: Tensor, cov: Tensor) -> Tensor:
    r""":math:`\mathbb E_{\mu \sim \mathcal N(m, S)} \log \mathcal N(\mu \mid 0, I)
    = -\tfrac D2 \log 2\pi - \tfrac12 \|m\|^2 - \tfrac12 \operatorname{tr} S`, per leading index."""
    d = loc.shape[-1]
    return -0.5 * d * LOG_2PI - 0.5 * loc.pow(2).sum(-1) - 0.5 * cov.diagonal(dim1=-2, dim2=-1).sum(-1)


def gaussian_expected_log_lik(z: Tensor, loc: Tensor, prec_tril: Tensor, loc_cov: Tensor | None = None) -> Tensor:
    r"""Component log-likelihoods :math:`\ell_{nk}`, shape ``z.shape[:-1] + (K,)``.

    .. math:: \ell_{nk} = \tfrac12\log|\Lambda_k| - \tfrac D2\log 2\pi - \tfrac12 (z_n - m_k)^\top\Lambda_k(z_n - m_k)
              - \tfrac12\operatorname{tr}(\Lambda_k S_k)

    ``loc_cov`` is :math:`S_k` (VMM); ``None`` drops the trace term (GMM: :math:`\log\mathcal N(z|\mu_k,\Lambda_k^{-1})`).
    The quadratic form is expanded, :math:`z^\top\Lambda_k z - 2 z^\top\Lambda_k m_k + m_k^\top\Lambda_k m_k`, so
    it is three matrix products with ``(N, K)`` outputs and no ``(N, K, D)`` intermediate (3-7x faster on CPU).
    """
    d = z.shape[-1]
    precision = prec_tril @ prec_tril.transpose(-1, -2)  # Lambda_k, (K, D, D)
    maha = _mahalanobis(z, loc, precision)
    log_det = 2.0 * prec_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    out = 0.5 * log_det - 0.5 * d * LOG_2PI - 0.5 * maha
    if loc_cov is not None:
        out = out - 0.5 * (precision * loc_cov).sum((-2, -1))
    return out


def _mahalanobis(z: Tensor, loc: Tensor, precision: Tensor) -> Tensor:
    r""":math:`(z_n - m_k)^\top P_k (z_n - m_k)` for all ``n, k``, shape ``z.shape[:-1] + (K,)``, from the expanded
    form (clamped at 0 against rounding)."""
    d, k = z.shape[-1], loc.shape[0]
    flat = z.reshape(-1, d)
    outer = (flat.unsqueeze(-1) * flat.unsqueeze(-2)).reshape(-1, d * d)  # z z^T, (N, D^2)
    pm = (precision @ loc.unsqueeze(-1)).squeeze(-1)  # P_k m_k, (K, D)
    quad = outer @ precision.reshape(k, d * d).T - 2.0 * (flat @ pm.T) + (loc * pm).sum(-1)
    return quad.clamp_min(0.0).reshape(*z.shape[:-1], k)


def _mean_cov(q: torch.distributions.Distribution) -> tuple[Tensor, Tensor]:
    """Mean and full covariance of a Gaussian ``q`` (diagonal ``Normal.to_event(1)`` or ``MultivariateNormal``)."""
    if isinstance(q, torch.distributions.MultivariateNormal):
        return q.loc, q.covariance_matrix
    if isinstance(q, torch.distributions.Independent) and isinstance(q.base_dist, torch.distributions.Normal):
        return q.base_dist.loc, torch.diag_embed(q.base_dist.scale.pow(2))
    raise TypeError(
        f"pseudo-input encoder returned {type(q).__name__}; expected MultivariateNormal or Normal(...).to_event(1)"
    )


class GaussianMixture(dist.TorchDistribution):
    r""":math:`p(z) = \sum_k \pi_k\, \mathcal N(z \mid m_k, P_k^{-1})`: batch shape ``()``, event ``(D,)``.

    The distribution of the ``z`` site in the ELBO step for the GMM and the VMM.  ``log_prob`` works from the
    precisions :math:`P_k` with the expanded quadratic form (:func:`_mahalanobis`), 3-4x cheaper than
    ``MixtureSameFamily(MultivariateNormal)`` (no per-pair triangular solves); ``sample``, ``mixture_distribution``
    and ``component_distribution`` are those of the equivalent ``MixtureSameFamily``.
    ``log_det`` (``log|P_k|``, shape ``(K,)``) may be passed when it is already known.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(
        self, log_pi: Tensor, loc: Tensor, precision: Tensor, log_det: Tensor | None = None, validate_args=None
    ) -> None:
        self.log_pi, self.loc, self.precision = log_pi, loc, precision
        self._log_det = log_det
        super().__init__(torch.Size(), loc.shape[-1:], validate_args=validate_args)

    @property
    def log_det(self) -> Tensor:
        if self._log_det is None:
            tril = torch.linalg.cholesky(self.precision)
            self._log_det = 2.0 * tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return self._log_det

    @property
    def mixture_distribution(self) -> dist.Categorical:
        return dist.Categorical(logits=self.log_pi)

    @property
    def component_distribution(self) -> dist.MultivariateNormal:
        return dist.MultivariateNormal(self.loc, precision_matrix=self.precision)

    def component_log_prob(self, z: Tensor) -> Tensor:
        r""":math:`\log \mathcal N(z_n \mid m_k, P_k^{-1})`, shape ``z.shape[:-1] + (K,)``."""
        d = self.loc.shape[-1]
        return 0.5 * self.log_det - 0.5 * d * LOG_2PI - 0.5 * _mahalanobis(z, self.loc, self.precision)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return torch.logsumexp(self.component_log_prob(value) + self.log_pi, -1)

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            return dist.MixtureSameFamily(self.mixture_distribution, self.component_distribution).sample(sample_shape)

    @property
    def mean(self) -> Tensor:
        return (self.log_pi.exp().unsqueeze(-1) * self.loc).sum(-2)


@dataclass(frozen=True)
class MixtureParams:
    """Current mixture parameters (constrained values, on the prior's device)."""

    log_pi: Tensor  #: (K,) log mixture weights
    loc: Tensor  #: (K, D) component means (GMM: mu_k; VMM: m_k)
    prec_tril: Tensor  #: (K, D, D) Cholesky factors L_k of the precisions Lambda_k = L_k L_k^T
    loc_cov: Tensor | None = None  #: (K, D, D) S_k, covariance of q(mu_k | u_k) (VMM only)

    def detach(self) -> MixtureParams:
        """The same values off the autograd graph."""
        return MixtureParams(
            self.log_pi.detach(), self.loc.detach(), self.prec_tril.detach(),
            None if self.loc_cov is None else self.loc_cov.detach(),
        )

    def predictive_mixture(self) -> GaussianMixture:
        r""":math:`\sum_k \pi_k \mathcal N(m_k, \Lambda_k^{-1} + S_k)` (GMM: :math:`S_k = 0`, precision
        :math:`\Lambda_k` directly)."""
        if self.loc_cov is None:
            precision = self.prec_tril @ self.prec_tril.transpose(-1, -2)
            log_det = 2.0 * self.prec_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            return GaussianMixture(self.log_pi, self.loc, precision, log_det)
        cov_tril = torch.linalg.cholesky(torch.cholesky_inverse(self.prec_tril) + self.loc_cov)
        log_det = -2.0 * cov_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return GaussianMixture(self.log_pi, self.loc, torch.cholesky_inverse(cov_tril), log_det)

    def predictive_components(self) -> dist.MultivariateNormal:
        r""":math:`\mathcal N(m_k, \Lambda_k^{-1} + S_k)` (GMM: :math:`S_k = 0`), batch shape ``(K,)``."""
        cov = torch.cholesky_inverse(self.prec_tril)
        if self.loc_cov is not None:
            cov = cov + self.loc_cov
        return dist.MultivariateNormal(self.loc, scale_tril=torch.linalg.cholesky(cov))
