"""The EM objective of the mixture priors written out again, independently of ``pyro_vmm.priors``' math.

Only the parameterisation is taken from the prior (its constrained parameters ``logits``, ``prec_tril``, ``alpha``,
``loc`` / ``pseudo_inputs``); every density is ``torch.distributions``' own, and the expectation over the VMM's
``q(mu_k | u_k)`` is written from its mean and covariance.  Used by the EM tests of ``test_infer.py`` and
``test_priors.py`` to check the library against something that can disagree with it.
"""

from __future__ import annotations

import torch
from torch.distributions import Dirichlet, Gamma, MultivariateNormal, Normal, Wishart


def mixture_parts(prior, encoder=None):
    """``(log_pi, loc, precision, loc_cov)`` from the prior's raw parameters (``loc_cov`` is ``None`` for the GMM)."""
    log_pi = torch.log_softmax(prior.logits, -1)
    tril = prior.prec_tril
    precision = tril @ tril.transpose(-1, -2)
    if prior.name == "gmm":
        return log_pi, prior.loc, precision, None
    q = encoder(prior.pseudo_inputs)
    if isinstance(q, torch.distributions.Independent):
        return log_pi, q.base_dist.loc, precision, torch.diag_embed(q.base_dist.scale.pow(2))
    return log_pi, q.loc, precision, q.covariance_matrix


def component_log_lik(z, loc, precision, loc_cov=None):
    r""":math:`E_{q(\mu_k)} \log N(z_n | \mu_k, \Lambda_k^{-1})`, (B, K): the Gaussian log-density at the mean of
    ``q`` minus :math:`\tfrac12 \operatorname{tr}(\Lambda_k S_k)` (nothing subtracted for the GMM)."""
    ell = MultivariateNormal(loc, precision_matrix=precision).log_prob(z.unsqueeze(-2))
    if loc_cov is not None:
        ell = ell - 0.5 * torch.einsum("kij,kji->k", precision, loc_cov)
    return ell


def hyperprior_log_density(prior, encoder=None):
    """Sum of the hyperprior log-densities that enter the EM loss in ``prior.inference`` (not divided by B).

    mle: none; map: Dir(pi | 1/K) (alpha fixed at 1, as the reference code's MAP), Wishart, mean prior;
    map-dp: the same with Dir(pi | 1/(K alpha)) and alpha ~ Gamma(1, 1).
    """
    log_pi, loc, precision, loc_cov = mixture_parts(prior, encoder)
    if prior.inference == "mle":
        return loc.new_zeros(())
    k, d = loc.shape
    out = loc.new_zeros(())
    alpha = loc.new_tensor(1.0)
    if prior.inference == "map-dp":
        alpha = prior.alpha
        out = out + Gamma(loc.new_tensor(1.0), loc.new_tensor(1.0)).log_prob(alpha)
    out = out + Dirichlet((1.0 / (k * alpha)).expand(k)).log_prob(log_pi.exp())
    scale = k ** (2.0 / d) / (d + 2.0)
    out = out + Wishart(torch.tensor(d + 2.0, dtype=loc.dtype), covariance_matrix=scale * torch.eye(d, dtype=loc.dtype)
                        ).log_prob(precision).sum()
    # E_{N(m, S)} log N(mu | 0, I) = log N(m | 0, I) - tr(S) / 2 (GMM: S = 0)
    out = out + Normal(loc.new_tensor(0.0), loc.new_tensor(1.0)).log_prob(loc).sum()
    if loc_cov is not None:
        out = out - 0.5 * loc_cov.diagonal(dim1=-2, dim2=-1).sum()
    return out


def expected_complete_data_loss(prior, z, encoder=None):
    r"""Textbook EM objective: :math:`-\frac1B[\sum_{nk} r_{nk}(\log\pi_k + \ell_{nk}) + \log p(\theta)]` with the
    responsibilities :math:`r` computed at the current parameters and detached."""
    log_pi, loc, precision, loc_cov = mixture_parts(prior, encoder)
    joint = component_log_lik(z, loc, precision, loc_cov) + log_pi
    r = torch.softmax(joint, -1).detach()
    return -((r * joint).sum() + hyperprior_log_density(prior, encoder)) / z.shape[0]


def marginal_loss(prior, z, encoder=None):
    r""":math:`-\frac1B[\sum_n \log\sum_k \pi_k e^{\ell_{nk}} + \log p(\theta)]`: the value of the enumerated loss."""
    log_pi, loc, precision, loc_cov = mixture_parts(prior, encoder)
    joint = component_log_lik(z, loc, precision, loc_cov) + log_pi
    return -(torch.logsumexp(joint, -1).sum() + hyperprior_log_density(prior, encoder)) / z.shape[0]
