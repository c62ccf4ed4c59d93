"""ELBO surgery estimators against a linear-Gaussian VAE whose evidence is known in closed form."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vmm.priors import build_prior
from pyro_vmm.images.surgery import aggregate_posterior_terms, elbo_surgery


class LinearGaussianVAE(nn.Module):
    """z ~ N(0, I_D), x | z ~ N(W z + b, s^2 I_P); q(z | x) = N(A x + c, T T^T) (deliberately not the posterior)."""

    def __init__(self, p: int = 5, d: int = 2, s: float = 0.5, inflate: float = 1.5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(p, d, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(p, generator=g, dtype=torch.float64))
        self.s = s
        self.prior = build_prior("normal", d).double()
        self.pseudo_encoder = None
        # exact posterior: cov = (I + W^T W / s^2)^-1, mean = cov W^T (x - b) / s^2; q uses an inflated,
        # diagonal-only version of it so the IWAE bound is not trivially tight
        cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + self.w.T @ self.w / s**2)
        self.gain = (cov @ self.w.T / s**2).detach()
        self.q_scale = (inflate * cov.diagonal().sqrt()).detach()

    def posterior(self, x):
        loc = (x - self.b) @ self.gain.T
        return dist.Normal(loc, self.q_scale.expand_as(loc)).to_event(1)

    def log_likelihood(self, x, z):
        return dist.Normal(z @ self.w.T + self.b, self.s).to_event(1).log_prob(x)

    def evidence(self, x):
        cov = self.w @ self.w.T + self.s**2 * torch.eye(self.w.shape[0], dtype=torch.float64)
        return dist.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def analytic_terms(self, x):
        """E_q log p(x|z), KL(q || N(0, I)) and log E_q p(x|z), per datum."""
        q = self.posterior(x)
        m, var = q.base_dist.loc, q.base_dist.scale.pow(2)
        mean_x = m @ self.w.T + self.b
        p = self.w.shape[0]
        exp_ll = dist.Normal(mean_x, self.s).to_event(1).log_prob(x) - (self.w.pow(2) @ var[0]).sum() / (
            2 * self.s**2
        )
        kl = 0.5 * (var.sum(-1) + m.pow(2).sum(-1) - m.shape[-1] - var.log().sum(-1))
        pred_cov = self.w @ torch.diag(var[0]) @ self.w.T + self.s**2 * torch.eye(p, dtype=torch.float64)
        pred = dist.MultivariateNormal(mean_x, covariance_matrix=pred_cov).log_prob(x)
        return exp_ll, kl, pred


@pytest.fixture
def lg():
    vae = LinearGaussianVAE()
    with torch.no_grad():
        z = torch.randn(100, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        x = z @ vae.w.T + vae.b + vae.s * torch.randn(100, 5, generator=torch.Generator().manual_seed(2),
                                                       dtype=torch.float64)
    return vae, x


def test_iwae_matches_the_analytic_evidence(lg):
    vae, x = lg
    out = elbo_surgery(vae, x, n_samples=2000, n_aggregate_samples=4, seed=0)
    with torch.no_grad():
        truth = float(vae.evidence(x).mean())
    assert out.log_px == pytest.approx(truth, abs=0.01)
    # the ELBO is visibly looser than the evidence (q is not the posterior), so the check above is not trivial
    assert out.elbo < truth - 0.05


def test_distortion_rate_and_predictive_match_closed_forms(lg):
    vae, x = lg
    out = elbo_surgery(vae, x, n_samples=2000, n_aggregate_samples=2, seed=3)
    with torch.no_grad():
        exp_ll, kl, pred = (float(t.mean()) for t in vae.analytic_terms(x))
    assert out.neg_distortion == pytest.approx(exp_ll, abs=0.02)
    assert out.rate == pytest.approx(kl, abs=0.02)
    assert out.log_px_given_x == pytest.approx(pred, abs=0.02)
    assert out.elbo == pytest.approx(out.neg_distortion - out.rate)


def test_iwae_bounds_the_elbo_and_mutual_information_is_bounded(lg):
    vae, x = lg
    for m in (1, 5, 50):
        out = elbo_surgery(vae, x[:60], n_samples=m, n_aggregate_samples=m, seed=m)
        assert out.log_px >= out.elbo - 1e-9
        assert out.mutual_information <= math.log(60) + 1e-9
        assert out.log_n == pytest.approx(math.log(60))
        # with all draws in the aggregate terms, rate = marginal KL + I[z; n] exactly
        assert out.rate == pytest.approx(out.marginal_kl + out.mutual_information, abs=1e-9)
    assert elbo_surgery(vae, x[:60], n_samples=1, seed=0).log_px == pytest.approx(
        elbo_surgery(vae, x[:60], n_samples=1, seed=0).elbo
    )


def test_mutual_information_reaches_log_n_for_separated_posteriors():
    """Posteriors far apart: q(z) at a draw is its own component / N, so I[z; n] = log N."""
    n, d = 8, 2
    loc = torch.arange(n, dtype=torch.float64)[:, None] * torch.tensor([100.0, 0.0], dtype=torch.float64)
    tril = torch.eye(d, dtype=torch.float64).expand(n, d, d) * 0.1
    z = loc + 0.1 * torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    own, agg = aggregate_posterior_terms(z, torch.arange(n), loc, tril, chunk_size=3)
    torch.testing.assert_close(own - agg, torch.full((n,), math.log(n), dtype=torch.float64))
    ref = dist.MultivariateNormal(loc, scale_tril=tril).log_prob(z)
    torch.testing.assert_close(own, ref)


def test_aggregate_posterior_is_the_mixture_density():
    g = torch.Generator().manual_seed(5)
    n, d = 6, 3
    loc = torch.randn(n, d, generator=g, dtype=torch.float64)
    a = torch.randn(n, d, d, generator=g, dtype=torch.float64) * 0.5
    tril = torch.linalg.cholesky(a @ a.mT + 0.3 * torch.eye(d, dtype=torch.float64))
    z = torch.randn(11, d, generator=g, dtype=torch.float64)
    owner = torch.randint(0, n, (11,), generator=g)
    own, agg = aggregate_posterior_terms(z, owner, loc, tril, chunk_size=4)
    comps = dist.MultivariateNormal(loc, scale_tril=tril)
    mix = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(n, dtype=torch.float64)), comps)
    torch.testing.assert_close(agg, mix.log_prob(z))
    torch.testing.assert_close(own, comps.log_prob(z[:, None, :])[torch.arange(11), owner])


def test_rejects_bad_sample_counts(lg):
    vae, x = lg
    with pytest.raises(ValueError, match="n_aggregate_samples"):
        elbo_surgery(vae, x[:5], n_samples=3, n_aggregate_samples=4)
