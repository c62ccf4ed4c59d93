"""The alternating VI / enumerated-EM loop."""

from __future__ import annotations

import copy

import pytest
import torch
from _em_reference import expected_complete_data_loss, hyperprior_log_density, marginal_loss

from pyro_vmm import AlternatingSVI, set_seed
from pyro_vmm.mixtures import gaussian_expected_log_lik
from pyro_vmm.priors import GaussianMixturePrior, VampPriorMixture, build_prior


class _PriorOnly(torch.nn.Module):
    def __init__(self, prior, pseudo_posterior=None):
        super().__init__()
        self.prior = prior
        if pseudo_posterior is not None:
            self.pseudo_posterior = pseudo_posterior


def _with_prior(vae, name, inference, k=6):
    """The toy VAE with its prior rebuilt in the given inference mode, with non-uniform weights."""
    vae.prior = build_prior(name, 2, k, pseudo_inputs=torch.randn(k, 6), inference=inference)
    with torch.no_grad():
        vae.prior.logits_unconstrained.copy_(torch.randn(k))
        vae.prior.prec_tril_raw_unconstrained.add_(0.3 * torch.randn(k, 2, 2).tril())
        if inference == "map-dp":
            vae.prior.alpha_unconstrained.fill_(0.3)  # alpha = softplus(0.3) = 0.85: the Gamma and 1/(K alpha) matter
    return vae


@pytest.mark.parametrize("inference", ["map-dp", "map", "mle"])
@pytest.mark.parametrize("name", ["gmm", "vmm"])
def test_em_gradient_is_expected_complete_data_gradient(name, inference, toy_vae):
    """grad of the enumerated EM loss == grad of the textbook expected complete-data log-likelihood, written
    independently (tests/_em_reference.py: torch.distributions densities, responsibilities computed and detached)."""
    set_seed(0)
    vae = _with_prior(toy_vae(prior=name, n_components=6), name, inference)
    svi = AlternatingSVI(vae, make_optimizers=False)
    z = 1.5 * torch.randn(13, 2)
    params = list(vae.prior.em_parameters())
    assert len(params) == (4 if inference == "map-dp" else 3)

    loss = svi.em_loss_at(z)
    grads = torch.autograd.grad(loss, params)
    reference = expected_complete_data_loss(vae.prior, z, vae.pseudo_posterior)
    ref_grads = torch.autograd.grad(reference, params)
    for p, g, g_ref in zip(params, grads, ref_grads, strict=True):
        assert g_ref.abs().max() > 1e-3, "every EM parameter must get a gradient from the reference"
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=lambda m, s=tuple(p.shape): f"{s}: {m}")
    # the value is the marginal (enumerated) form of the same objective
    torch.testing.assert_close(loss, marginal_loss(vae.prior, z, vae.pseudo_posterior), rtol=1e-5, atol=1e-5)
    # not vacuous: outside MLE the hyperprior changes the gradient of every parameter it touches
    if inference != "mle":
        hyper = hyperprior_log_density(vae.prior, vae.pseudo_posterior)
        for g in torch.autograd.grad(hyper, params):
            assert g.abs().max() > 1e-3


@pytest.mark.parametrize("inference", ["map-dp", "map", "mle"])
def test_gmm_em_gradient_matches_the_closed_form(inference):
    r"""The GMM's EM gradient against the hand-derived one (no autograd on the reference):
    d/d logits_j = -(1/B)[sum_n (r_nj - pi_j) + (c - 1)(1 - K pi_j)] and
    d/d mu_k = -(1/B)[sum_n r_nk Lambda_k (z_n - mu_k) - mu_k], the hyperprior terms only outside MLE."""
    torch.manual_seed(5)
    k, d, b = 5, 3, 17
    prior = GaussianMixturePrior(d, k, inference=inference)
    with torch.no_grad():
        prior.logits_unconstrained.copy_(torch.randn(k))
        if inference == "map-dp":
            prior.alpha_unconstrained.fill_(-0.5)
    z = 1.5 * torch.randn(b, d)
    svi = AlternatingSVI(_PriorOnly(prior), make_optimizers=False)
    g_logits, g_loc = torch.autograd.grad(svi.em_loss_at(z), [prior.logits_unconstrained, prior.loc_unconstrained])

    with torch.no_grad():
        pi = torch.softmax(prior.logits, -1)
        precision = prior.prec_tril @ prior.prec_tril.mT
        comp = torch.distributions.MultivariateNormal(prior.loc, precision_matrix=precision).log_prob(z[:, None])
        r = torch.softmax(comp + pi.log(), -1)  # (B, K)
        want_logits = (r - pi).sum(0)
        diff = z[:, None, :] - prior.loc  # (B, K, D)
        want_loc = torch.einsum("nk,kde,nke->kd", r, precision, diff)
        if inference != "mle":
            alpha = prior.alpha if inference == "map-dp" else 1.0
            want_logits = want_logits + (1.0 / (k * alpha) - 1.0) * (1.0 - k * pi)
            want_loc = want_loc - prior.loc
    torch.testing.assert_close(g_logits, -want_logits / b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_loc, -want_loc / b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["gmm", "vmm"])
def test_fused_em_loss_and_assignments_equal_separate_calls(name, toy_vae):
    """One pseudo-input pass for the EM loss and the cluster tracking gives the same numbers as two."""
    set_seed(3)
    vae = toy_vae(prior=name, n_components=5)
    with torch.no_grad():
        vae.prior.logits_unconstrained.copy_(torch.randn(5))
    svi = AlternatingSVI(vae, make_optimizers=False)
    z = 2 * torch.randn(40, 2)
    loss, assign = svi.em_loss_and_assignments_at(z)
    torch.testing.assert_close(loss, svi.em_loss_at(z))
    expected = vae.prior.assign(z, svi.pseudo_encoder)
    assert torch.equal(assign, expected) and len(torch.unique(expected)) > 1
    params = list(vae.prior.em_parameters())
    for g, g_ref in zip(torch.autograd.grad(loss, params), torch.autograd.grad(svi.em_loss_at(z), params), strict=True):
        torch.testing.assert_close(g, g_ref)


def test_attached_responsibilities_reproduce_reference_objective(toy_vae):
    """attach_responsibilities=True: -(1/B)[sum_nk r_nk (l_nk + log pi_k) + log p(theta)] with r on the graph."""
    set_seed(1)
    vae = toy_vae(prior="gmm", n_components=4)
    z = torch.randn(10, 2)
    plain = AlternatingSVI(vae, make_optimizers=False).em_loss_at(z)
    ref = AlternatingSVI(vae, make_optimizers=False, attach_responsibilities=True).em_loss_at(z)
    p = vae.prior.mixture_params()
    joint = gaussian_expected_log_lik(z, p.loc, p.prec_tril) + p.log_pi
    r = torch.softmax(joint, -1)
    hyper = -hyperprior_log_density(vae.prior) / z.shape[0]  # written independently (tests/_em_reference.py)
    torch.testing.assert_close(plain, -torch.logsumexp(joint, -1).mean() + hyper)
    torch.testing.assert_close(ref, -(r * joint).sum(-1).mean() + hyper)
    assert not torch.allclose(ref, plain)
    # its gradient is not the textbook EM gradient (r is differentiated too)
    params = list(vae.prior.em_parameters())
    g_ref, g_plain = torch.autograd.grad(ref, params[:1]), torch.autograd.grad(plain, params[:1])
    assert not torch.allclose(g_ref[0], g_plain[0])


def test_em_recovers_a_known_mixture():
    """EM alone (z fixed), K = 20, 4 well separated 2-D components: 4 used, means within 0.1, rest pruned."""
    set_seed(0)
    truth = torch.tensor([[-3.0, -3.0], [3.0, -3.0], [-3.0, 3.0], [3.0, 3.0]])
    n = 1000
    labels = torch.arange(n) % 4
    z = truth[labels] + 0.3 * torch.randn(n, 2)
    prior = GaussianMixturePrior(2, 20)
    svi = AlternatingSVI(_PriorOnly(prior), lr=0.05)
    for _ in range(600):  # stochastic EM on minibatches of z: the 1/B-scaled Dirichlet prunes components
        svi.em_step_at(z[torch.randint(0, n, (128,))])
    for group in svi.optimizers[1].param_groups:  # then settle on the optimum with full-batch steps
        group["lr"] = 0.01
    for _ in range(200):
        svi.em_step_at(z)
    assign = prior.assign(z)
    used = assign.unique()
    assert used.numel() == 4
    pi = prior.mixture_params().log_pi.exp()
    for k in used:
        members = labels[assign == k]
        assert members.unique().numel() == 1, "each used component must hold one true component"
        assert torch.linalg.norm(prior.loc[k] - truth[members[0]]) < 0.1
        assert torch.linalg.norm(prior.loc[k] - z[assign == k].mean(0)) < 0.02  # the MAP mean ~ the sample mean
    unused = torch.ones(20, dtype=torch.bool)
    unused[used] = False
    assert pi[~unused].sum() > 0.99
    assert pi[unused].max() < 1e-3


def _three_clusters(n: int = 600):
    truth = torch.tensor([[-4.0, 0.0], [4.0, -3.0], [0.0, 4.0]])
    labels = torch.arange(n) % 3
    return truth, labels, truth[labels] + 0.4 * torch.randn(n, 2)


def _fit_vmm_at_fixed_z(inference: str):
    """The VMM prior alone (K = 10, pseudo-inputs in a 3-D input space, a fixed linear encoder u -> N(u W, 0.1^2 I))
    fitted by EM steps at fixed z drawn from 3 well separated 2-D Gaussians."""
    set_seed(0)
    truth, labels, z = _three_clusters()
    w = torch.tensor([[1.0, 0.5], [-0.5, 1.0], [0.3, -0.2]])

    def encoder(u):
        return torch.distributions.Independent(torch.distributions.Normal(u @ w, torch.full((u.shape[0], 2), 0.1)), 1)

    start = z[torch.randperm(z.shape[0])[:10]]  # pseudo-inputs whose means are 10 data points: several per cluster
    prior = VampPriorMixture(2, 10, torch.linalg.lstsq(w.T, start.T).solution.T, inference=inference)
    svi = AlternatingSVI(_PriorOnly(prior, encoder), lr=0.05)
    for _ in range(300):  # stochastic EM on minibatches, then full-batch steps at a lower rate
        svi.em_step_at(z[torch.randint(0, z.shape[0], (128,))])
    for group in svi.optimizers[1].param_groups:
        group["lr"] = 0.01
    for _ in range(100):
        svi.em_step_at(z)
    return prior, encoder, truth, labels, z


def test_vmm_prunes_the_components_that_own_no_data():
    """MAP-DP: of K = 10 pseudo-input components started on data points, the weights of those left without data
    shrink to ~0 and exactly the 3 true clusters keep weight, one component each, at the true means; under MLE (no
    Dirichlet prior) the same fit keeps spare components, so the pruning is the hyperprior's doing."""
    prior, encoder, truth, labels, z = _fit_vmm_at_fixed_z("map-dp")
    with torch.no_grad():
        p = prior.mixture_params(encoder)
        pi = p.log_pi.exp()
        assign = prior.assign(z, encoder)
    used = assign.unique()
    assert used.numel() == 3
    assert int((pi > 0.01).sum()) == 3
    unused = torch.ones(10, dtype=torch.bool)
    unused[used] = False
    assert pi[unused].max() < 1e-3 and pi[~unused].sum() > 0.99
    for k in used:
        members = labels[assign == k]
        assert members.unique().numel() == 1, "each used component must hold one true cluster, whole"
        assert (members.numel() == 200) and torch.linalg.norm(p.loc[k] - truth[members[0]]) < 0.1

    mle, encoder, *_ = _fit_vmm_at_fixed_z("mle")
    with torch.no_grad():
        assert int((mle.mixture_params(encoder).log_pi.exp() > 0.01).sum()) > 3


@pytest.mark.parametrize("inference", ["map-dp", "map", "mle"])
def test_em_steps_train_alpha_only_in_map_dp(inference):
    """alpha (the DP concentration) is an EM parameter in map-dp only: EM steps move it there and leave it at 1 in
    map and mle, while the weights, precisions and means move in every mode."""
    torch.manual_seed(0)
    prior = GaussianMixturePrior(2, 6, inference=inference)
    svi = AlternatingSVI(_PriorOnly(prior), lr=0.05)
    before = {n: t.detach().clone() for n, t in prior.state_dict().items()}
    for _ in range(5):
        svi.em_step_at(2 * torch.randn(64, 2))
    after = prior.state_dict()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == {"logits_unconstrained", "prec_tril_raw_unconstrained", "loc_unconstrained"} | (
        {"alpha_unconstrained"} if inference == "map-dp" else set()
    )
    if inference != "map-dp":
        assert prior.alpha.item() == pytest.approx(1.0)


def test_vi_step_leaves_prior_and_em_step_leaves_networks(toy_vae):
    set_seed(2)
    vae = toy_vae(prior="vmm")
    svi = AlternatingSVI(vae, lr=1e-2)
    x = torch.randn(32, 6)
    svi.step(x)  # warm the optimisers' state
    prior_keys = [k for k in vae.state_dict() if k.startswith("prior.")]
    net_keys = [k for k in vae.state_dict() if not k.startswith("prior.")]
    assert prior_keys and net_keys and any("running_mean" in k for k in net_keys)

    before = copy.deepcopy(vae.state_dict())
    svi.vi_step(x)
    after = vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in prior_keys), "the ELBO step changed a prior parameter"
    assert any(not torch.equal(before[k], after[k]) for k in net_keys)

    before = copy.deepcopy(vae.state_dict())
    svi.em_step(x)
    after = vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in net_keys), "the EM step changed a network parameter"
    assert all(not torch.equal(before[k], after[k]) for k in prior_keys)


def test_vampprior_pseudo_inputs_are_trained_by_the_vi_step(toy_vae):
    set_seed(3)
    vae = toy_vae(prior="vampprior")
    svi = AlternatingSVI(vae, lr=1e-2)
    assert svi.optimizers[1] is None
    u0 = vae.prior.pseudo_inputs.detach().clone()
    svi.step(torch.randn(16, 6))
    assert not torch.equal(u0, vae.prior.pseudo_inputs.detach())


@pytest.mark.parametrize("name", ["normal", "vampprior", "gmm", "vmm"])
def test_same_seed_gives_identical_parameters(name, toy_vae):
    def run():
        set_seed(123)
        vae = toy_vae(prior=name)
        svi = AlternatingSVI(vae, lr=1e-2)
        data = torch.randn(64, 6)
        for i in range(5):
            svi.step(data[16 * (i % 4): 16 * (i % 4 + 1)])
        return vae.state_dict()

    a, b = run(), run()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_decreases_the_loss_and_clusters(toy_vae):
    """End to end on a toy mixture in data space: the loss falls and the VMM uses > 1 cluster."""
    set_seed(4)
    centers = torch.randn(3, 6) * 4
    x = centers[torch.arange(300) % 3] + 0.3 * torch.randn(300, 6)
    vae = toy_vae(prior="vmm", n_components=10)
    svi = AlternatingSVI(vae, lr=1e-2)
    first = svi.evaluate_loss(x)
    for _ in range(150):
        svi.step(x[torch.randperm(300)[:64]])
    assert svi.evaluate_loss(x) < first
    with torch.no_grad():
        z = vae.encoder.eval()(x).chunk(2, -1)[0]
        assert vae.prior.assign(z, vae.pseudo_posterior).unique().numel() > 1


def test_rejects_modules_without_a_prior():
    with pytest.raises(TypeError, match="LatentPrior"):
        AlternatingSVI(torch.nn.Linear(2, 2))
