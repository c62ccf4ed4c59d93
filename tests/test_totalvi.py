"""totalVI as a Pyro program (models/totalvi.py) and its protein likelihood (pyro_vmm/distributions.py)."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from scvi.distributions import NegativeBinomialMixture

from pyro_vmm.distributions import ProteinCounts
from pyro_vmm.infer import AlternatingSVI
from pyro_vmm.models.totalvi import VMMTOTALVIModule, protein_background_prior
from pyro_vmm.utils import eval_mode


def _nb_log_prob(value: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log NB(value | mean mu, inverse dispersion theta) with torch's failure-count parameterisation."""
    return torch.distributions.NegativeBinomial(total_count=theta, logits=mu.log() - theta.log()).log_prob(value)


def _protein_params(b: int = 7, t: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    log_beta = torch.randn(b, t, generator=g, dtype=torch.float64) + 2.0
    alpha = 1.0 + 5.0 * torch.rand(b, t, generator=g, dtype=torch.float64)
    log_theta = torch.randn(t, generator=g, dtype=torch.float64)
    logits = 2.0 * torch.randn(b, t, generator=g, dtype=torch.float64)
    y = torch.poisson(torch.exp(log_beta) * (1.0 + 2.0 * torch.rand(b, t, generator=g, dtype=torch.float64)))
    y[0, 0] = 0.0
    return log_beta, alpha, log_theta, logits, y


def test_protein_mixture_matches_logsumexp_of_two_torch_nbs():
    log_beta, alpha, log_theta, logits, y = _protein_params()
    beta, theta = log_beta.exp(), log_theta.exp().expand_as(log_beta)
    background = F.logsigmoid(logits) + _nb_log_prob(y, beta, theta)
    foreground = F.logsigmoid(-logits) + _nb_log_prob(y, alpha * beta, theta)
    expected = torch.logsumexp(torch.stack([background, foreground]), 0).sum(-1)
    d = ProteinCounts(log_beta, alpha, log_theta, logits)
    assert d.batch_shape == (7,) and d.event_shape == (5,)
    torch.testing.assert_close(d.log_prob(y), expected, rtol=1e-6, atol=1e-6)


def test_protein_mixture_matches_scvi_negative_binomial_mixture():
    log_beta, alpha, log_theta, logits, y = _protein_params(seed=1)
    theta = log_theta.exp().expand_as(log_beta)
    ref = NegativeBinomialMixture(mu1=log_beta.exp(), mu2=alpha * log_beta.exp(), theta1=theta, mixture_logits=logits)
    d = ProteinCounts(log_beta, alpha, log_theta, logits)
    torch.testing.assert_close(d.log_prob(y), ref.log_prob(y).sum(-1))
    pi = torch.sigmoid(logits)
    torch.testing.assert_close(d.mean, pi * log_beta.exp() + (1 - pi) * alpha * log_beta.exp())
    assert d.sample().shape == y.shape


def _toy(prior: str = "normal", gene_likelihood: str = "nb", n_batch: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    g, t, b = 12, 4, 6
    pseudo = torch.poisson(torch.full((3, g + t), 4.0)) if prior in ("vmm", "vampprior") else None
    module = VMMTOTALVIModule(
        g, t, n_batch, n_latent=3, n_hidden=8, gene_likelihood=gene_likelihood, prior=prior, n_clusters=3,
        pseudo_inputs=pseudo,
        protein_background_prior_mean=np.arange(t * n_batch, dtype=float).reshape(t, n_batch) / 10.0,
        protein_background_prior_scale=np.full((t, n_batch), 0.7),
    ).double()
    x = torch.poisson(torch.full((b, g), 3.0, dtype=torch.float64))
    x[:, 0] += 1.0  # every cell has a positive library size
    y = torch.poisson(torch.full((b, t), 30.0, dtype=torch.float64))
    batch = torch.tensor([[0], [1], [1], [0], [1], [0]]) % n_batch
    return module, x, y, batch


@pytest.mark.parametrize("gene_likelihood", ["nb", "zinb"])
def test_model_log_joint_at_fixed_latents_is_the_hand_computed_sum(gene_likelihood):
    module, x, y, batch = _toy(gene_likelihood=gene_likelihood)
    b, t = y.shape
    z = torch.randn(b, 3, dtype=torch.float64)
    log_beta = torch.randn(b, t, dtype=torch.float64) + 1.0
    with eval_mode(module), torch.no_grad():
        conditioned = poutine.condition(module.model, data={"z": z, "log_beta": log_beta})
        trace = poutine.trace(conditioned).get_trace(x, batch, y=y)
        joint = trace.log_prob_sum()
        out = module.decode(z, batch)

        # hand-written terms, from the decoder's raw outputs and the module's parameters
        s = batch.reshape(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
        c, d = module.background_pro_alpha.T[s], module.background_pro_log_beta.exp().T[s]
        assert torch.allclose(c[1], torch.arange(t, dtype=torch.float64) * 0.2 + 0.1)  # batch 1's column
        log_pbeta = torch.distributions.Normal(c, d).log_prob(log_beta).sum()
        mu = x.sum(-1, keepdim=True) * torch.softmax(out["scale_logits"], -1)
        theta = module.px_r.exp().expand_as(mu)
        nb = _nb_log_prob(x, mu, theta)
        if gene_likelihood == "zinb":
            h = out["gate_logits"]
            zero = torch.log(torch.sigmoid(h) + torch.sigmoid(-h) * nb.exp())
            nb = torch.where(x == 0, zero, F.logsigmoid(-h) + nb)
        log_px = nb.sum()
        beta, phi = log_beta.exp(), module.py_r.exp().expand_as(log_beta)
        pi_logits, alpha = out["mixing_logits"], out["foreground_scale"]
        assert (alpha >= 1.0).all()
        log_py = torch.logsumexp(
            torch.stack([F.logsigmoid(pi_logits) + _nb_log_prob(y, beta, phi),
                         F.logsigmoid(-pi_logits) + _nb_log_prob(y, alpha * beta, phi)]), 0
        ).sum()
    torch.testing.assert_close(joint, (log_pz + log_pbeta + log_px + log_py) / b)


def test_guide_sites_and_background_posterior_read_z():
    module, x, y, batch = _toy()
    trace = poutine.trace(module.guide).get_trace(x, batch, y=y)
    assert [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"] and s["fn"] is not None and n != "data"] == ["z", "log_beta"]
    z = trace.nodes["z"]["value"]
    with eval_mode(module):
        q1 = module.background_posterior(z, batch).base_dist.loc
        q2 = module.background_posterior(z + 1.0, batch).base_dist.loc
    assert q1.shape == y.shape and not torch.allclose(q1, q2)


@pytest.mark.parametrize("prior", ["normal", "gmm", "vampprior", "vmm"])
def test_every_prior_gives_a_finite_elbo_and_em_loss(prior):
    module, x, y, batch = _toy(prior)
    svi = AlternatingSVI(module, lr=1e-2)
    result = svi.step(x, batch, y=y)
    assert np.isfinite(result.elbo_loss)
    assert (result.em_loss is not None) == (prior in ("gmm", "vmm"))
    if prior in ("vmm", "vampprior"):  # (K, G + T + soft batch)
        assert module.prior.pseudo_inputs.shape == (3, 12 + 4 + 2)
        assert module.pseudo_posterior(module.prior.pseudo_inputs).mean.shape == (3, 3)


def test_foreground_softplus_activation():
    module = VMMTOTALVIModule(5, 3, 1, n_latent=2, n_hidden=4, prior="normal", foreground_activation="softplus")
    with eval_mode(module):
        alpha = module.decode(torch.randn(4, 2), torch.zeros(4, 1, dtype=torch.long))["foreground_scale"]
    assert (alpha > 1.0).all()
    with pytest.raises(ValueError, match="foreground_activation"):
        VMMTOTALVIModule(5, 3, 1, prior="normal", foreground_activation="exp")


def test_background_prior_rule_picks_the_low_component():
    rng = np.random.default_rng(0)
    y = np.hstack([rng.poisson(5.0, (40, 8)), rng.poisson(400.0, (40, 6))]).astype(float)
    batch = np.repeat([0, 1], 20)
    mean, scale = protein_background_prior(y, batch, n_batch=3, n_cells=20)
    assert mean.shape == scale.shape == (14, 3)
    assert np.allclose(mean[:, :2], np.log1p(5.0), atol=0.3) and (scale[:, :2] > 0).all()
    assert (mean[:, 2] == 0).all() and (scale[:, 2] == 1).all()  # a batch without cells


@pytest.fixture(scope="module")
def cite_small(shared_data):
    from pyro_vmm.data.cite import load_cite

    adata = load_cite(shared_data / "cite")
    counts = np.asarray(adata.X.sum(0)).ravel()
    genes = np.sort(np.argsort(-counts)[:300])
    x = torch.as_tensor(adata.X[:, genes].toarray())
    y = torch.as_tensor(adata.obsm["protein_expression"].to_numpy())
    batch = torch.as_tensor(adata.obs["batch"].cat.codes.to_numpy().copy(), dtype=torch.long).reshape(-1, 1)
    mean, scale = protein_background_prior(y.numpy(), batch.numpy(), n_batch=2, n_cells=30)
    return x, y, batch, mean, scale


@pytest.fixture
def one_thread():
    """Small networks: one torch thread is fastest, and on a busy box two threads crawl (spin-waiting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("prior", ["normal", "vmm"])
def test_smoke_training_on_cite_seq(cite_small, one_thread, prior):
    x, y, batch, mean, scale = cite_small
    assert x.shape == (400, 300) and y.shape == (400, 14)
    pyro.set_rng_seed(0)
    k = 10
    pseudo = torch.cat([x, y], -1)[torch.randperm(x.shape[0])[:k]] if prior == "vmm" else None
    module = VMMTOTALVIModule(
        300, 14, 2, n_latent=5, n_hidden=32, prior=prior, n_clusters=k, pseudo_inputs=pseudo,
        protein_background_prior_mean=mean, protein_background_prior_scale=scale,
    )
    svi = AlternatingSVI(module, lr=4e-3)
    torch.manual_seed(1)
    before = np.mean([svi.evaluate_loss(x, batch, y=y) for _ in range(3)])
    for _ in range(200):
        idx = torch.randint(0, x.shape[0], (128,))
        result = svi.step(x[idx], batch[idx], y=y[idx])
        assert np.isfinite(result.elbo_loss)
        if prior == "vmm":
            assert np.isfinite(result.em_loss)
    after = np.mean([svi.evaluate_loss(x, batch, y=y) for _ in range(3)])
    assert np.isfinite(after) and after < before - 0.05 * abs(before)
    z = module.latent_mean(x, batch, y=y)
    assert z.shape == (400, 5) and torch.isfinite(z).all()
    probs = module.cluster_probs(x, batch, y=y)
    assert probs.shape == (400, k if prior == "vmm" else 1)
    x_rep, y_rep = module.posterior_predictive(x[:8], batch[:8], 2, y=y[:8], proteins=True)
    assert x_rep.shape == (8, 300, 2) and y_rep.shape == (8, 14, 2)


def test_training_plan_trains_it_from_scvi_minibatches(shared_data, one_thread):
    """The same Lightning plan as VMMSCVI (alternating VI / EM step) on TOTALVI-registered minibatches."""
    import lightning.pytorch as pl
    import scvi
    from scvi.dataloaders import DataSplitter

    from pyro_vmm.data.cite import load_cite
    from pyro_vmm.scvi import VMMTrainingPlan

    adata = load_cite(shared_data / "cite")
    adata = adata[:, np.argsort(-np.asarray(adata.X.sum(0)).ravel())[:100]].copy()
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
    manager = scvi.model.TOTALVI(adata, n_latent=2, n_hidden=4, empirical_protein_background_prior=False).adata_manager
    splitter = DataSplitter(manager, train_size=0.9, batch_size=128)
    splitter.setup()
    (x, batch), kwargs = VMMTOTALVIModule._get_fn_args_from_batch(next(iter(splitter.train_dataloader())))
    assert x.shape == (128, 100) and kwargs["y"].shape == (128, 14) and batch.shape == (128, 1)
    k = 5
    pseudo = torch.cat([torch.as_tensor(adata.X[:k].toarray()),
                        torch.as_tensor(adata.obsm["protein_expression"].to_numpy()[:k])], -1)
    module = VMMTOTALVIModule(100, 14, 2, n_latent=4, n_hidden=16, prior="vmm", n_clusters=k, pseudo_inputs=pseudo)
    plan = VMMTrainingPlan(module, lr=4e-3)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(plan, splitter.train_dataloader(), splitter.val_dataloader())
    metrics = plan.last_epoch_metrics
    assert np.isfinite(metrics["elbo_train"]) and np.isfinite(metrics["em_loss_train"])
    assert np.isfinite(float(trainer.callback_metrics["elbo_validation"]))
