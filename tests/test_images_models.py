"""The image VAE (four priors) and VaDE: math of each piece, Pyro-program contract, tiny smoke runs."""

from __future__ import annotations

import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from sklearn.mixture import GaussianMixture

from pyro_vmm import AlternatingSVI, set_seed
from pyro_vmm.models.vade import VaDE, gaussian_kl_to_components
from pyro_vmm.models.vae import ImageVAE, TriLGaussianEncoder

HIDDEN = (16, 16, 24)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: with pytest -n 2 on 2 shared cores, more threads only oversubscribe."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _data(n=40, p=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(3, p, generator=g) * 2 - 1
    return (centers[torch.arange(n) % 3] + 0.1 * torch.randn(n, p, generator=g)).clamp(-1, 1)


def test_tril_encoder_is_a_full_covariance_gaussian():
    set_seed(0)
    enc = TriLGaussianEncoder(7, 4, (8,))
    q = enc(torch.randn(5, 7))
    tril = q.scale_tril
    assert tril.shape == (5, 4, 4)
    assert torch.equal(tril, tril.tril())  # lower-triangular
    assert torch.all(tril.diagonal(dim1=-2, dim2=-1) > 1e-5)
    assert torch.any(tril.tril(-1).abs() > 0)  # off-diagonal terms are used (full covariance)
    # the diagonal is softplus(raw) + 1e-5 of the network's outputs
    out = enc.net(torch.zeros(1, 7))
    q0 = enc(torch.zeros(1, 7))
    raw_diag = out[0, 4:][[0, 2, 5, 9]]  # tril_indices order: (0,0),(1,0),(1,1),(2,0),(2,1),(2,2),...
    torch.testing.assert_close(q0.scale_tril[0].diagonal(), torch.nn.functional.softplus(raw_diag) + 1e-5)
    torch.testing.assert_close(q0.loc[0], out[0, :4])


def test_pseudo_inputs_are_distinct_training_images_and_sigma_starts_at_one():
    x = _data()
    vae = ImageVAE.from_data(x, prior="vmm", n_components=6, n_latent=2, hidden=HIDDEN, seed=1)
    u = vae.prior.pseudo_inputs.detach()
    assert u.shape == (6, 12)
    matches = (u[:, None, :] == x[None]).all(-1)
    assert torch.all(matches.sum(1) >= 1)
    assert len({int(i) for i in matches.float().argmax(1)}) == 6
    assert float(vae.sigma.detach()) == pytest.approx(1.0)
    assert ImageVAE.from_data(x, prior="gmm", n_components=6, n_latent=2, hidden=HIDDEN).prior.name == "gmm"
    with pytest.raises(ValueError, match="pseudo_inputs"):
        ImageVAE(12, 2, prior="vmm", n_components=6)
    with pytest.raises(ValueError, match="only 40"):
        ImageVAE.from_data(x, prior="vampprior", n_components=41)


def test_init_sigma_sets_the_initial_likelihood_scale_and_is_checked():
    x = torch.rand(20, 6) * 2 - 1
    vae = ImageVAE.from_data(x, prior="vmm", n_components=4, n_latent=2, hidden=(8, 8, 8), init_sigma=0.2)
    torch.testing.assert_close(vae.sigma, torch.tensor(0.2))
    assert vae.config["init_sigma"] == 0.2
    assert ImageVAE(**vae.config, pseudo_inputs=vae.prior.pseudo_inputs.detach()).sigma.item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="init_sigma must be a finite number > 0"):
        ImageVAE(6, n_latent=2, prior="normal", hidden=(8,), init_sigma=0.0)


@pytest.mark.parametrize("prior", ["normal", "vampprior", "gmm", "vmm"])
def test_model_guide_log_density_is_the_batch_mean_elbo(prior):
    """log p(x, z) - log q(z | x) from Pyro's traces == (1/B) sum_n [log N(x|f(z), s^2) + log p(z) - log q(z|x)]."""
    set_seed(2)
    x = _data(n=9)
    vae = ImageVAE.from_data(x, prior=prior, n_components=5, n_latent=3, hidden=HIDDEN)
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    pyro_elbo = model_tr.log_prob_sum() - guide_tr.log_prob_sum()
    z = guide_tr.nodes["z"]["value"]
    with torch.no_grad():
        ll = dist.Normal(vae.decoder(z), vae.sigma).to_event(1).log_prob(x)
        lp = vae.prior.latent_dist(vae.pseudo_encoder).log_prob(z)
        lq = vae.posterior(x).log_prob(z)
    torch.testing.assert_close(pyro_elbo.detach(), ((ll + lp - lq) / 9).sum())


def test_pseudo_posterior_is_the_encoder():
    x = _data()
    vae = ImageVAE.from_data(x, prior="vampprior", n_components=4, n_latent=2, hidden=HIDDEN)
    u = vae.prior.pseudo_inputs
    a, b = vae.pseudo_posterior(u), vae.posterior(u)
    torch.testing.assert_close(a.loc, b.loc)
    torch.testing.assert_close(a.scale_tril, b.scale_tril)
    assert vae.training  # eval mode is restored


@pytest.mark.parametrize("prior", ["normal", "vampprior", "gmm", "vmm"])
def test_every_prior_trains_on_tiny_data(prior):
    set_seed(3)
    x = _data(n=60)
    vae = ImageVAE.from_data(x, prior=prior, n_components=8, n_latent=2, hidden=HIDDEN)
    svi = AlternatingSVI(vae, lr=1e-2)
    first = svi.evaluate_loss(x)
    for i in range(40):
        res = svi.step(x[(i * 16) % 60 : (i * 16) % 60 + 16])
        assert math.isfinite(res.elbo_loss)
        assert (res.em_loss is not None) == (prior in ("gmm", "vmm"))
    assert svi.evaluate_loss(x) < first
    clone = ImageVAE.from_data(x, prior=prior, n_components=8, n_latent=2, hidden=HIDDEN)
    clone.load_state_dict(vae.state_dict())
    torch.testing.assert_close(clone.decode(torch.zeros(1, 2)), vae.decode(torch.zeros(1, 2)))


# ----------------------------------------------------------------------------------------------------------------
# VaDE
# ----------------------------------------------------------------------------------------------------------------
def test_gaussian_kl_matches_torch():
    g = torch.Generator().manual_seed(0)
    d = 3
    a = torch.randn(4, d, d, generator=g, dtype=torch.float64)
    s_tril = torch.linalg.cholesky(a @ a.mT + 0.5 * torch.eye(d, dtype=torch.float64))
    b = torch.randn(5, d, d, generator=g, dtype=torch.float64)
    p_tril = torch.linalg.cholesky(b @ b.mT + 0.5 * torch.eye(d, dtype=torch.float64))
    loc = torch.randn(4, d, generator=g, dtype=torch.float64)
    mu = torch.randn(5, d, generator=g, dtype=torch.float64)
    ours = gaussian_kl_to_components(loc, s_tril, mu, p_tril)
    q = torch.distributions.MultivariateNormal(loc[:, None], scale_tril=s_tril[:, None])
    p = torch.distributions.MultivariateNormal(mu, precision_matrix=p_tril @ p_tril.mT)
    torch.testing.assert_close(ours, torch.distributions.kl_divergence(q, p))


def test_gaussian_mixture_init_uses_the_lower_cholesky_of_the_precision():
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.8], [0.8, 1.0]])  # strongly correlated: a diagonal-only init would be visibly wrong
    z = np.concatenate([rng.multivariate_normal(m, cov * 0.1, 300) for m in ([0, 0], [3, 3], [-3, 3])])
    gm = GaussianMixture(3, covariance_type="full", random_state=0).fit(z)
    vade = VaDE(5, n_latent=2, n_components=3, hidden=(8,))
    vade.init_from_gaussian_mixture(gm)
    p = vade.prior.mixture_params()
    prec = (p.prec_tril @ p.prec_tril.mT).detach().double().numpy()
    np.testing.assert_allclose(prec, gm.precisions_, rtol=1e-4)
    np.testing.assert_allclose(p.loc.detach().numpy(), gm.means_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p.log_pi.exp().detach().numpy(), gm.weights_, rtol=1e-5)
    assert torch.equal(p.prec_tril, p.prec_tril.tril())
    # sklearn's precisions_cholesky_ is upper-triangular: copying it (the reference's bug) loses the correlation
    assert np.abs(np.triu(gm.precisions_cholesky_[0], 1)).max() > 0.1
    # and the responsibilities are sklearn's
    r = vade.responsibilities(torch.as_tensor(z[:50], dtype=torch.float32)).exp().detach().numpy()
    np.testing.assert_allclose(r, gm.predict_proba(z[:50]), atol=1e-4)


def test_vade_elbo_equals_pyro_traceenum_of_its_model_and_guide():
    """Both are unbiased estimates of the same objective: compare means over many draws (float64)."""
    set_seed(5)
    torch.set_default_dtype(torch.float64)
    try:
        x = _data(n=4, p=6)
        vade = VaDE(6, n_latent=2, n_components=3, hidden=(8,))
        with torch.no_grad():
            vade.prior.loc_unconstrained.copy_(torch.randn(3, 2))
            vade.prior.logits_unconstrained.copy_(torch.tensor([0.3, -0.2, 0.1]))
        n = 20000
        with torch.no_grad():
            ours = -vade.elbo(x.repeat(n, 1)).reshape(n, 4).mean(1)  # n independent estimates of the batch loss
            elbo = TraceEnum_ELBO(max_plate_nesting=1, num_particles=n, vectorize_particles=True)
            theirs = elbo.loss(vade.model, vade.guide, x)
        se = float(ours.std()) / math.sqrt(n)
        assert abs(float(ours.mean()) - theirs) < 4 * math.sqrt(2) * se, (float(ours.mean()), theirs, se)
        assert se < 0.05 * abs(theirs)  # the comparison is tight enough to catch a wrong term
        # the pre-training objective is the reconstruction term alone
        torch.manual_seed(0)
        pre = vade.loss(x, kl_weight=0.0)
        torch.manual_seed(0)
        q = vade.posterior(x)
        torch.testing.assert_close(pre, -vade.log_likelihood(x, q.rsample()).mean())
    finally:
        torch.set_default_dtype(torch.float32)


def test_vade_smoke_training():
    from pyro_vmm.images.evaluation import evaluate_clustering
    from pyro_vmm.images.training import TrainingConfig, train_vade

    x = _data(n=90)
    labels = torch.arange(90) % 3
    vade = VaDE.from_data(x, n_components=3, n_latent=2, hidden=HIDDEN)
    cfg = TrainingConfig(epochs=3, batch_size=30, lr=1e-2, patience=None, progress=False, val_fraction=0.2)
    hist = train_vade(vade, x, cfg, pretrain_epochs=2)
    assert len(hist.pretrain_loss) == 2 and hist.epochs_run == 3
    assert all(math.isfinite(v) for v in hist.train_loss + hist.val_loss)
    scores = evaluate_clustering(vade, x, labels)
    assert 1 <= scores.utilized_clusters <= 3
    with pytest.raises(ValueError, match="Gaussian mixture"):
        VaDE.from_data(x, prior="vmm")
