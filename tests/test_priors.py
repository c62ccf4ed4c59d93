"""The prior math against Monte Carlo and torch.distributions."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from pyro_vmm.priors import (
    GaussianMixturePrior,
    MixtureParams,
    VampPriorMixture,
    build_prior,
    dirichlet_log_prob_logits,
    expected_normal_log_prob,
    gaussian_expected_log_lik,
    wishart_log_prob_cholesky,
)


def _random_spd_tril(k: int, d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(k, d, d, generator=gen) * 0.3
    return torch.linalg.cholesky(a @ a.transpose(-1, -2) + torch.eye(d))


def _random_cov(k: int, d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(k, d, d, generator=gen) * 0.4
    return a @ a.transpose(-1, -2) + 0.1 * torch.eye(d)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_expected_log_lik_matches_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    k, d, n_mc = 3, 4, 200_000
    loc, cov = torch.randn(k, d, generator=gen), _random_cov(k, d, gen)
    prec_tril = _random_spd_tril(k, d, gen)
    z = torch.randn(5, d, generator=gen)
    analytic = gaussian_expected_log_lik(z, loc, prec_tril, cov)  # (5, K)
    q_mu = torch.distributions.MultivariateNormal(loc, covariance_matrix=cov)
    mu = q_mu.sample((n_mc,), )  # (S, K, D)
    lik = torch.distributions.MultivariateNormal(mu, precision_matrix=prec_tril @ prec_tril.mT)
    draws = lik.log_prob(z[:, None, None, :])  # (5, S, K)
    mc, se = draws.mean(1), draws.std(1) / math.sqrt(n_mc)
    assert torch.all((analytic - mc).abs() <= 3 * se + 1e-9), (analytic - mc) / se


def test_gmm_log_lik_is_gaussian_log_density():
    gen = torch.Generator().manual_seed(1)
    loc, prec_tril = torch.randn(4, 3, generator=gen), _random_spd_tril(4, 3, gen)
    z = torch.randn(7, 3, generator=gen)
    ref = torch.distributions.MultivariateNormal(loc, precision_matrix=prec_tril @ prec_tril.mT).log_prob(z[:, None])
    torch.testing.assert_close(gaussian_expected_log_lik(z, loc, prec_tril), ref)


def test_predictive_density_matches_monte_carlo():
    """N(z | m, Lambda^-1 + S) = E_{mu ~ N(m, S)} N(z | mu, Lambda^-1)."""
    gen = torch.Generator().manual_seed(2)
    k, d, n_mc = 3, 2, 200_000
    params = MixtureParams(
        torch.log_softmax(torch.randn(k, generator=gen), -1),
        torch.randn(k, d, generator=gen),
        _random_spd_tril(k, d, gen),
        _random_cov(k, d, gen),
    )
    z = torch.randn(4, d, generator=gen) * 0.5
    analytic = params.predictive_components().log_prob(z[:, None]).exp()  # (4, K)
    mu = torch.distributions.MultivariateNormal(params.loc, covariance_matrix=params.loc_cov).sample((n_mc,))
    dens = torch.distributions.MultivariateNormal(
        mu, precision_matrix=params.prec_tril @ params.prec_tril.mT
    ).log_prob(z[:, None, None]).exp()  # (4, S, K)
    mc, se = dens.mean(1), dens.std(1) / math.sqrt(n_mc)
    assert torch.all((analytic - mc).abs() <= 3 * se), (analytic - mc) / se


def test_expected_mean_hyperprior_matches_monte_carlo():
    gen = torch.Generator().manual_seed(3)
    k, d, n_mc = 3, 5, 200_000
    loc, cov = torch.randn(k, d, generator=gen), _random_cov(k, d, gen)
    mu = torch.distributions.MultivariateNormal(loc, covariance_matrix=cov).sample((n_mc,))
    draws = torch.distributions.Normal(0.0, 1.0).log_prob(mu).sum(-1)  # (S, K)
    mc, se = draws.mean(0), draws.std(0) / math.sqrt(n_mc)
    assert torch.all((expected_normal_log_prob(loc, cov) - mc).abs() <= 3 * se)


@pytest.mark.parametrize("k, conc", [(5, 0.2), (10, 0.01), (3, 2.5)])
def test_dirichlet_matches_torch(k, conc):
    logits = torch.randn(k)
    ours = dirichlet_log_prob_logits(torch.log_softmax(logits, -1), conc)
    ref = torch.distributions.Dirichlet(torch.full((k,), conc)).log_prob(torch.softmax(logits, -1))
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("k, d", [(4, 2), (20, 10), (3, 30)])
def test_wishart_matches_torch(k, d):
    gen = torch.Generator().manual_seed(k * d)
    tril = _random_spd_tril(k, d, gen)
    df, scale = d + 2.0, k ** (2.0 / d) / (d + 2.0)
    ours = wishart_log_prob_cholesky(tril, df, scale)
    ref = torch.distributions.Wishart(df, covariance_matrix=scale * torch.eye(d)).log_prob(tril @ tril.mT)
    torch.testing.assert_close(ours, ref)


def test_wishart_constants_are_the_papers():
    prior = GaussianMixturePrior(10, 100)
    assert prior.wishart_df == 12
    assert prior.wishart_scale == pytest.approx(0.2093, abs=1e-4)  # reference facts: V diag 0.2093
    assert prior.wishart_df * prior.wishart_scale == pytest.approx(100 ** 0.2)  # E[Lambda] = K^{2/D} I = 2.512 I


@pytest.mark.parametrize("name", ["gmm", "vmm"])
def test_em_program_hyperprior_sites_equal_torch_log_densities(name):
    """Every hyperprior site of em_model, summed, equals the torch.distributions log-densities / B."""
    torch.manual_seed(0)
    k, d, b, x_dim = 6, 3, 11, 4
    prior = build_prior(name, d, k, pseudo_inputs=torch.randn(k, x_dim))
    with torch.no_grad():
        prior.logits_unconstrained.copy_(torch.randn(k))
        prior.alpha_unconstrained.fill_(0.3)
    w = torch.randn(x_dim, d)

    def encoder(u):
        return torch.distributions.Independent(torch.distributions.Normal(u @ w, torch.ones(k, d) * 0.7), 1)

    z = torch.randn(b, d)
    tr = poutine.trace(prior.em_model).get_trace(z, encoder)
    tr.compute_log_prob()
    hyper = sum(tr.nodes[s]["log_prob_sum"] for s in ("alpha", "pi", "precision", "mu"))
    alpha = prior.alpha
    p = prior.mixture_params(encoder)
    ref = torch.distributions.Gamma(1.0, 1.0).log_prob(alpha)
    ref = ref + torch.distributions.Dirichlet(torch.full((k,), 1.0 / (k * alpha.item()))).log_prob(p.log_pi.exp())
    ref = ref + torch.distributions.Wishart(d + 2.0, covariance_matrix=prior.wishart_scale * torch.eye(d)).log_prob(
        p.prec_tril @ p.prec_tril.mT
    ).sum()
    if name == "gmm":
        ref = ref + torch.distributions.Normal(0.0, 1.0).log_prob(prior.loc).sum()
    else:
        ref = ref + expected_normal_log_prob(p.loc, p.loc_cov).sum()
    torch.testing.assert_close(hyper, ref / b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("inference", ["map-dp", "map", "mle"])
@pytest.mark.parametrize("name", ["gmm", "vmm"])
def test_hyperprior_terms_of_each_inference_mode(name, inference):
    """mle: no hyperprior site; map: Dir(pi | 1/K), Wishart and the mean prior, no Gamma on alpha (alpha fixed, not an
    EM parameter); map-dp: all four, alpha trained.  The sites' sum equals the independently written densities / B."""
    from _em_reference import hyperprior_log_density

    torch.manual_seed(4)
    k, d, b, x_dim = 7, 3, 10, 4
    prior = build_prior(name, d, k, pseudo_inputs=torch.randn(k, x_dim), inference=inference)
    with torch.no_grad():
        prior.logits_unconstrained.copy_(torch.randn(k))
        if inference == "map-dp":
            prior.alpha_unconstrained.fill_(-0.4)
    w = torch.randn(x_dim, d)

    def encoder(u):
        return torch.distributions.Independent(torch.distributions.Normal(u @ w, torch.full((k, d), 0.6)), 1)

    z = torch.randn(b, d)
    tr = poutine.trace(prior.em_model).get_trace(z, encoder)
    tr.compute_log_prob()
    expected_sites = {"map-dp": {"alpha", "pi", "precision", "mu"}, "map": {"pi", "precision", "mu"}, "mle": set()}
    hyper_sites = {s for s in ("alpha", "pi", "precision", "mu") if s in tr.nodes}
    assert hyper_sites == expected_sites[inference]
    names = {n for n, p in prior.named_parameters() if any(p is q for q in prior.em_parameters())}
    assert ("alpha_unconstrained" in names) == (inference == "map-dp")
    total = sum((tr.nodes[s]["log_prob_sum"] for s in hyper_sites), torch.zeros(()))
    torch.testing.assert_close(total, hyperprior_log_density(prior, encoder) / b, rtol=1e-6, atol=1e-9)
    if inference == "map":  # the Dirichlet's concentration is 1/K, whatever alpha's Gamma prior would say
        pi = prior.mixture_params(encoder).log_pi.exp()
        ref = torch.distributions.Dirichlet(torch.full((k,), 1.0 / k)).log_prob(pi) / b
        torch.testing.assert_close(tr.nodes["pi"]["log_prob_sum"], ref)
    if inference != "mle":  # alpha moves the loss only where it is an EM parameter
        (g_alpha,) = torch.autograd.grad(total, prior.alpha_unconstrained, allow_unused=True)
        assert (g_alpha is not None and g_alpha.abs() > 0) == (inference == "map-dp")


def test_em_loss_is_negative_marginal_log_likelihood_plus_hyperprior():
    torch.manual_seed(1)
    k, d, b = 5, 2, 9
    prior = GaussianMixturePrior(d, k)
    z = torch.randn(b, d)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(prior.em_model, lambda *a: None, z, None)
    p = prior.mixture_params()
    log_pz = torch.logsumexp(gaussian_expected_log_lik(z, p.loc, p.prec_tril) + p.log_pi, -1).sum()
    tr = poutine.trace(prior.em_model).get_trace(z, None)
    tr.compute_log_prob()
    hyper = sum(tr.nodes[s]["log_prob_sum"] for s in ("alpha", "pi", "precision", "mu"))
    torch.testing.assert_close(loss, -(log_pz / b + hyper))


@pytest.mark.parametrize("name", ["gmm", "vmm"])
def test_cluster_probs_equal_pyro_enumerated_marginals(name):
    torch.manual_seed(2)
    k, d = 4, 3
    prior = build_prior(name, d, k, pseudo_inputs=torch.randn(k, d))

    def encoder(u):
        return torch.distributions.Independent(torch.distributions.Normal(u, torch.full_like(u, 0.5)), 1)

    z = torch.randn(8, d)
    marg = TraceEnum_ELBO(max_plate_nesting=1).compute_marginals(prior.em_model, lambda *a: None, z, encoder)
    torch.testing.assert_close(prior.cluster_probs(z, encoder), marg["c"].probs)


def test_vmm_uses_predictive_components_in_elbo_and_expected_form_in_assignment():
    torch.manual_seed(3)
    k, d = 3, 2
    prior = VampPriorMixture(d, k, pseudo_inputs=torch.randn(k, d))

    def encoder(u):
        return torch.distributions.Independent(torch.distributions.Normal(u, torch.full_like(u, 0.8)), 1)

    z = torch.randn(6, d)
    p = prior.mixture_params(encoder)
    cov = torch.cholesky_inverse(p.prec_tril) + torch.diag_embed(torch.full((k, d), 0.64))
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=p.log_pi), torch.distributions.MultivariateNormal(p.loc, cov)
    ).log_prob(z)
    torch.testing.assert_close(prior.latent_dist(encoder).log_prob(z), ref)
    expected = gaussian_expected_log_lik(z, p.loc, p.prec_tril) - 0.5 * 0.64 * torch.ones(6, k) * (
        p.prec_tril @ p.prec_tril.mT
    ).diagonal(dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(prior.cluster_logits(z, encoder), expected + p.log_pi)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown prior"):
        build_prior("dpmm", 2, 3)
    with pytest.raises(ValueError, match="n_components"):
        build_prior("gmm", 2, 0)
    with pytest.raises(ValueError, match="n_latent"):
        build_prior("gmm", 0, 3)
    with pytest.raises(ValueError, match="pseudo_inputs"):
        build_prior("vmm", 2, 3)
    with pytest.raises(ValueError, match="rows but K"):
        build_prior("vmm", 2, 3, pseudo_inputs=torch.zeros(4, 5))


def test_prior_parameters_live_in_state_dict_and_follow_the_module():
    prior = build_prior("vmm", 3, 4, pseudo_inputs=torch.zeros(4, 7))
    keys = set(prior.state_dict())
    assert {"logits_unconstrained", "prec_tril_raw_unconstrained", "alpha_unconstrained",
            "pseudo_inputs_unconstrained"} <= keys
    torch.testing.assert_close(prior.prec_tril, torch.eye(3).expand(4, 3, 3) * (1 + 1e-5), rtol=0, atol=1e-6)
    assert prior.alpha.item() == pytest.approx(1.0)
    prior2 = build_prior("vmm", 3, 4, pseudo_inputs=torch.ones(4, 7))
    prior2.load_state_dict(prior.state_dict())
    torch.testing.assert_close(prior2.pseudo_inputs, prior.pseudo_inputs)
    assert not pyro.get_param_store().keys(), "priors must not write to Pyro's global param store"


def test_inverse_softplus_is_stable_and_exact():
    from pyro_vmm.utils import inverse_softplus

    y = torch.tensor([1e-3, 0.5, 3.0, 50.0, 500.0, 1e5], dtype=torch.float32)
    u = inverse_softplus(y)
    assert torch.isfinite(u).all()
    torch.testing.assert_close(torch.nn.functional.softplus(u), y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_expanded_mahalanobis_equals_the_direct_form(scale):
    """The (N, K) matrix-product form of (z - m)^T P (z - m) equals the direct one, also far from the means."""
    from pyro_vmm.mixtures import _mahalanobis

    gen = torch.Generator().manual_seed(0)
    k, d = 7, 5
    loc = scale * torch.randn(k, d, generator=gen)
    tril = torch.randn(k, d, d, generator=gen).tril(-1) + torch.diag_embed(torch.rand(k, d, generator=gen) + 0.5)
    precision = tril @ tril.transpose(-1, -2)
    z = scale * torch.randn(3, 11, d, generator=gen)  # extra leading batch dimension
    diff = z.unsqueeze(-2) - loc
    direct = torch.einsum("...kd,kde,...ke->...k", diff, precision, diff)
    fast = _mahalanobis(z, loc, precision)
    assert fast.shape == (3, 11, k)
    torch.testing.assert_close(fast, direct, rtol=1e-4, atol=1e-3 * scale**2)
    assert (fast >= 0).all()


@pytest.mark.parametrize("with_loc_cov", [False, True])
def test_gaussian_mixture_equals_mixture_same_family(with_loc_cov):
    """The z-site distribution (precision form) equals torch's MixtureSameFamily(MultivariateNormal(cov))."""
    from pyro_vmm.mixtures import MixtureParams

    gen = torch.Generator().manual_seed(1)
    k, d = 6, 3
    tril = torch.randn(k, d, d, generator=gen).tril(-1) * 0.3 + torch.diag_embed(torch.rand(k, d, generator=gen) + 0.5)
    loc_cov = None
    if with_loc_cov:
        a = torch.randn(k, d, d, generator=gen) * 0.3
        loc_cov = a @ a.transpose(-1, -2) + 0.05 * torch.eye(d)
    params = MixtureParams(torch.log_softmax(torch.randn(k, generator=gen), -1), 2 * torch.randn(k, d, generator=gen),
                           tril, loc_cov)
    mix = params.predictive_mixture()
    cov = torch.cholesky_inverse(tril) + (loc_cov if with_loc_cov else 0)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=params.log_pi), torch.distributions.MultivariateNormal(params.loc, cov)
    )
    z = 3 * torch.randn(4, 9, d, generator=gen)
    torch.testing.assert_close(mix.log_prob(z), ref.log_prob(z), rtol=1e-5, atol=1e-4)
    # inside a plate Pyro expands it; samples have the event shape; the mean is the mixture mean
    expanded = mix.expand(torch.Size([9]))
    assert expanded.batch_shape == (9,) and expanded.log_prob(z).shape == (4, 9)
    assert mix.sample((5,)).shape == (5, d)
    torch.testing.assert_close(mix.mean, ref.mean)


# -- merge moves ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gmm", "vmm"])
def test_a_merge_move_gives_each_group_its_weight_and_keeps_the_parameter_objects(name):
    k, d = 6, 3
    prior = build_prior(name, d, k, pseudo_inputs=torch.randn(k, 7) if name == "vmm" else None)
    with torch.no_grad():
        prior.logits_unconstrained.copy_(torch.tensor([0.3, -1.0, 2.0, 0.0, 1.2, -0.4]))
    before = torch.softmax(prior.logits, -1).detach()
    held = prior.logits_unconstrained  # what an optimiser holds
    prior.merge_components(torch.tensor([1, 0, 1, -1, 0, 1]))  # groups {1, 4}, {0, 2, 5}; component 3 dropped
    after = torch.softmax(prior.logits, -1).detach()
    kept = before[[1, 4, 0, 2, 5]].sum()
    assert held is prior.logits_unconstrained and torch.equal(held, prior.logits_unconstrained)
    assert after[4] == pytest.approx(float(before[[1, 4]].sum() / kept), rel=1e-5)  # the larger of its group
    assert after[2] == pytest.approx(float(before[[0, 2, 5]].sum() / kept), rel=1e-5)
    assert float(after[[0, 1, 3, 5]].max()) < 1e-12


def test_merged_away_components_stay_empty_under_em_steps():
    """After a move the Dirichlet term keeps the emptied components empty: EM steps on data from all six components'
    region do not give them weight back."""
    from pyro_vmm import AlternatingSVI

    torch.manual_seed(0)
    prior = build_prior("gmm", 2, 6)
    module = torch.nn.Module()
    module.prior = prior
    module.model = module.guide = lambda *a, **k: None
    svi = AlternatingSVI(module, lr=0.05)
    z = torch.randn(256, 2)
    for _ in range(50):
        svi.em_step_at(z)
    prior.merge_components(torch.tensor([0, 0, 0, 1, 1, 1]))
    for _ in range(200):
        svi.em_step_at(z)
    pi = torch.softmax(prior.logits, -1).detach()
    assert int((pi > 1e-6).sum()) == 2


def test_a_merge_move_refuses_bad_groupings():
    prior = build_prior("gmm", 2, 4)
    with pytest.raises(ValueError, match="one entry per component"):
        prior.merge_components(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="drops every component"):
        prior.merge_components(torch.full((4,), -1))
