"""The alternating VI / enumerated-EM loop."""

from __future__ import annotations

import copy

import pytest
import torch

from pyro_vmm import AlternatingSVI, set_seed
from pyro_vmm.priors import GaussianMixturePrior, gaussian_expected_log_lik


class _PriorOnly(torch.nn.Module):
    def __init__(self, prior):
        super().__init__()
        self.prior = prior


@pytest.mark.parametrize("name", ["gmm", "vmm"])
def test_em_gradient_is_expected_complete_data_gradient(name, toy_vae):
    """grad of the enumerated loss == grad of -(1/B)[sum_nk r_nk (l_nk + log pi_k) + log hyper] with r held fixed."""
    set_seed(0)
    vae = toy_vae(prior=name, n_components=6)
    with torch.no_grad():
        vae.prior.logits_unconstrained.copy_(torch.randn(6))
    svi = AlternatingSVI(vae, make_optimizers=False)
    z = torch.randn(13, 2)
    params = list(vae.prior.em_parameters())

    loss = svi.em_loss_at(z)
    grads = torch.autograd.grad(loss, params, retain_graph=True)

    p = vae.prior.mixture_params(vae.pseudo_posterior)
    ell = gaussian_expected_log_lik(z, p.loc, p.prec_tril, p.loc_cov)
    joint = ell + p.log_pi
    r = torch.softmax(joint, -1).detach()
    hyper = loss + torch.logsumexp(joint, -1).mean()  # the hyperprior part of the loss, -log p(theta)/B
    q_loss = -(r * joint).sum(-1).mean() + hyper
    ref = torch.autograd.grad(q_loss, params, retain_graph=True)
    for g, g_ref in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    # and the hyperprior part of the loss really depends on the parameters (the check above is not vacuous)
    assert any(g.abs().sum() > 0 for g in torch.autograd.grad(hyper, params, allow_unused=True) if g is not None)


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
    set_seed(1)
    vae = toy_vae(prior="gmm", n_components=4)
    z = torch.randn(10, 2)
    plain = AlternatingSVI(vae, make_optimizers=False).em_loss_at(z)
    ref = AlternatingSVI(vae, make_optimizers=False, attach_responsibilities=True).em_loss_at(z)
    p = vae.prior.mixture_params()
    joint = gaussian_expected_log_lik(z, p.loc, p.prec_tril) + p.log_pi
    r = torch.softmax(joint, -1)
    hyper = plain + torch.logsumexp(joint, -1).mean()
    torch.testing.assert_close(ref, -(r * joint).sum(-1).mean() + hyper)
    assert not torch.allclose(ref, plain)


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
