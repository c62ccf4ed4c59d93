"""VMM-scVI: the Pyro scVI program, the Lightning plan and the scvi-tools model class, on a tiny real subset.

Data: 300 random cells x the 200 highest-count genes of ../shared/data/scrna/kang_ifnb_2800.h5ad (2 batches).
"""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

scvi = pytest.importorskip("scvi")
anndata = pytest.importorskip("anndata")

from pyro_vmm.models.scvi import (  # noqa: E402
    PSEUDO_COUNT_FLOOR,
    GeneCounts,
    VMMSCVIModule,
    counts_to_pseudo_inputs,
    inverse_softplus,
)
from pyro_vmm.scvi import VMMSCVI, InMemoryDataSplitter, MinibatchSampler  # noqa: E402

from _data import kang_subset  # noqa: E402

TINY = dict(n_latent=4, n_hidden=32, n_clusters=8)
TRAIN = dict(batch_size=64, enable_progress_bar=False, early_stopping=False)


@pytest.fixture(scope="module")
def small_adata(shared_data):
    sub = kang_subset(shared_data / "scrna" / "kang_ifnb_2800.h5ad")
    assert sub.obs["batch"].nunique() == 2
    return sub


def _setup(adata):
    a = adata.copy()
    VMMSCVI.setup_anndata(a, batch_key="batch", labels_key="cell_type")
    return a


@pytest.fixture(scope="module")
def trained_vmm(small_adata):
    a = _setup(small_adata)
    model = VMMSCVI(a, prior="vmm", seed=0, **TINY)
    # no merge moves: after 2 epochs the latent is one blob and a move would leave one component, while the getter
    # tests need several (the moves have their own tests)
    model.train(max_epochs=2, seed=0, merge_at=None, **TRAIN)
    return model


def _dense(x):
    return np.asarray(x.todense()) if hasattr(x, "todense") else np.asarray(x)


# ------------------------------------------------------------------------------------------------ the likelihood
def _random_module(gene_likelihood, n_genes=50, n_batch=2):
    torch.manual_seed(1)
    m = VMMSCVIModule(n_genes, n_batch, n_latent=3, n_hidden=16, gene_likelihood=gene_likelihood, prior="normal")
    with torch.no_grad():
        m.px_r.normal_(0.0, 1.0)  # theta != 1
    return m.eval()


@pytest.mark.parametrize("gene_likelihood", ["nb", "zinb"])
def test_likelihood_equals_scvi_distributions(small_adata, gene_likelihood):
    from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial

    x = torch.as_tensor(small_adata.X[:40, :50].toarray(), dtype=torch.float32)
    batch = torch.as_tensor(small_adata.obs["batch"].cat.codes.to_numpy()[:40], dtype=torch.long).reshape(-1, 1)
    m = _random_module(gene_likelihood)
    z = torch.randn(40, 3)
    library = x.sum(-1, keepdim=True)
    ours = m.likelihood(z, library, batch).log_prob(x)  # (40,) summed over genes
    _, _, mu, zi_logits = m.decoder("gene", z, torch.log(library), batch)
    theta = torch.exp(m.px_r)
    if gene_likelihood == "zinb":
        ref = ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=zi_logits).log_prob(x).sum(-1)
        stock = dist.ZeroInflatedNegativeBinomial(
            total_count=theta, logits=torch.log(mu + 1e-8) - torch.log(theta + 1e-8), gate_logits=zi_logits
        )
    else:
        ref = NegativeBinomial(mu=mu, theta=theta).log_prob(x).sum(-1)
        stock = dist.NegativeBinomial(total_count=theta, logits=torch.log(mu + 1e-8) - torch.log(theta + 1e-8))
    assert ours.shape == (40,)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ours, stock.to_event(1).log_prob(x), rtol=1e-5, atol=1e-3)


def _counts_inputs(zero_inflated, dtype=torch.float32, n=30, g=20):
    torch.manual_seed(0)
    value = (torch.poisson(torch.rand(n, g) * 3.0) * (torch.rand(n, g) < 0.4)).to(dtype)
    value[0, 0] = 250.0  # a large count
    value[:, 3] = 0.0  # a gene with no count
    value[2] = 0.0
    value[2, 5] = 1.0  # a cell with a single count
    scale_logits = (2 * torch.randn(n, g, dtype=dtype)).requires_grad_()
    log_library = value.sum(-1, keepdim=True).log().requires_grad_()
    log_theta = torch.randn(g, dtype=dtype, requires_grad=True)
    gate = (3 * torch.randn(n, g, dtype=dtype)).requires_grad_() if zero_inflated else None
    return value, scale_logits, log_library, log_theta, gate


def _pyro_counts(scale_logits, log_library, log_theta, gate):
    """Pyro's stock distributions, built independently of GeneCounts."""
    mu = log_library.exp() * torch.softmax(scale_logits, -1)
    logits = torch.log(mu) - log_theta
    if gate is None:
        return dist.NegativeBinomial(total_count=log_theta.exp(), logits=logits).to_event(1)
    return dist.ZeroInflatedNegativeBinomial(total_count=log_theta.exp(), logits=logits, gate_logits=gate).to_event(1)


@pytest.mark.parametrize("zero_inflated", [True, False])
def test_gene_counts_match_pyro_values_and_gradients(zero_inflated):
    value, *params = _counts_inputs(zero_inflated)
    inputs = [t for t in params if t is not None]
    ours = GeneCounts(*params)
    lp, ref = ours.log_prob(value), _pyro_counts(*params).log_prob(value)
    assert lp.shape == (30,) and ours.batch_shape == (30,) and ours.event_shape == (20,)
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-4)
    weights = torch.rand(30)  # a non-uniform upstream gradient
    g_ours = torch.autograd.grad((lp * weights).sum(), inputs)
    g_ref = torch.autograd.grad((ref * weights).sum(), inputs)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the value-only path (no gradient wanted) and given non-zero indices give the same numbers
    with torch.no_grad():
        torch.testing.assert_close(ours.log_prob(value), lp.detach())
    torch.testing.assert_close(GeneCounts(*params, nonzero=torch.nonzero(value, as_tuple=True)).log_prob(value), lp)
    # Pyro's machinery: expand broadcasts the per-cell densities; sampling is Pyro's
    torch.testing.assert_close(ours.expand((2, 30)).log_prob(value)[1], lp)
    assert ours.sample().shape == (30, 20) and ours.sample((3,)).shape == (3, 30, 20)
    torch.testing.assert_close(ours.mean, _pyro_counts(*params).mean)


def test_gene_counts_extreme_values_stay_finite():
    """Gate logits and means far out in the tails: the zero case is a log of a sum of two tiny terms."""
    value, scale_logits, log_library, log_theta, gate = _counts_inputs(True)
    with torch.no_grad():
        gate[:5] = -60.0  # sigma(h) ~ 1e-26
        scale_logits[:5] = 0.0
        log_library[:5] = 12.0  # mu ~ 8000 per gene: NB(0) ~ 0
        log_theta[:] = 3.0
    lp = GeneCounts(scale_logits, log_library, log_theta, gate).log_prob(value)
    assert torch.isfinite(lp).all()
    grads = torch.autograd.grad(lp.sum(), (scale_logits, log_library, log_theta, gate))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("zero_inflated", [True, False])
def test_gene_counts_gradcheck_float64(zero_inflated):
    value, *params = _counts_inputs(zero_inflated, torch.float64, n=8, g=6)
    value[0, 0] = 40.0
    inputs = tuple(t for t in params if t is not None)

    def f(*args):
        s, log_lib, r = args[:3]
        return GeneCounts(s, log_lib, r, args[3] if zero_inflated else None).log_prob(value)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_pseudo_inputs_start_at_the_cells_counts_with_uniform_batch():
    counts = torch.tensor([[0.0, 1.0, 7.0, 300.0], [2.0, 0.0, 0.0, 1.0]])
    raw = counts_to_pseudo_inputs(counts, n_batch=3)
    assert raw.shape == (2, 4 + 3)
    m = VMMSCVIModule(
        4, 3, n_latent=2, n_hidden=8, prior="vmm", n_clusters=2, pseudo_inputs=counts, encode_covariates=True
    )
    got_counts, got_batch = m.pseudo_counts(m.prior.pseudo_inputs)
    torch.testing.assert_close(got_counts, counts.clamp_min(PSEUDO_COUNT_FLOOR), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_batch, torch.full((2, 3), 1 / 3))
    # the default (as SCVI): the batch goes to the decoder only, and the pseudo-inputs are expression profiles
    d = VMMSCVIModule(4, 3, n_latent=2, n_hidden=8, prior="vmm", n_clusters=2, pseudo_inputs=counts)
    assert d.prior.pseudo_inputs.shape == (2, 4) and d.encoder.fc_layers[0][0].in_features == 4
    assert d.decoder.px_decoder.fc_layers[0][0].in_features == 2 + 3
    torch.testing.assert_close(torch.nn.functional.softplus(inverse_softplus(torch.tensor([1e-3, 2.0, 80.0]))),
                               torch.tensor([1e-3, 2.0, 80.0]))
    # the reference's shifted softplus: zeros need no clamping
    shifted = VMMSCVIModule(4, 1, n_latent=2, n_hidden=8, prior="vmm", n_clusters=2, pseudo_inputs=counts,
                            pseudo_input_shift=1.0)
    assert shifted.prior.pseudo_inputs.shape == (2, 4)  # single batch: no batch part
    torch.testing.assert_close(shifted.pseudo_counts(shifted.prior.pseudo_inputs)[0], counts, rtol=1e-5, atol=1e-5)


def test_pseudo_posterior_runs_encoder_in_eval_mode():
    counts = torch.poisson(torch.full((5, 10), 2.0))
    m = VMMSCVIModule(10, 2, n_latent=2, n_hidden=8, prior="vmm", n_clusters=5, pseudo_inputs=counts).train()
    q1, q2 = m.pseudo_posterior(m.prior.pseudo_inputs), m.pseudo_posterior(m.prior.pseudo_inputs)
    torch.testing.assert_close(q1.mean, q2.mean)  # no dropout, BN running statistics
    assert m.training and m.encoder.training  # mode restored
    running = m.encoder.fc_layers[0][1].running_mean.clone()
    m.pseudo_posterior(m.prior.pseudo_inputs)
    torch.testing.assert_close(m.encoder.fc_layers[0][1].running_mean, running)


# ------------------------------------------------------------------------------------------------ data loading
def test_split_equals_scvi_datasplitter(small_adata):
    a = _setup(small_adata)
    model = VMMSCVI(a, prior="normal", seed=0, **TINY)
    scvi.settings.seed = 3
    ours = InMemoryDataSplitter(model.adata_manager, train_size=0.8, batch_size=64)
    ours.setup()
    ref = scvi.dataloaders.DataSplitter(model.adata_manager, train_size=0.8, batch_size=64)
    ref.setup()
    np.testing.assert_array_equal(ours.train_idx, ref.train_idx)
    np.testing.assert_array_equal(ours.val_idx, ref.val_idx)
    batches = list(ours.train_dataloader())
    assert sum(len(b["X"]) for b in batches) == len(ref.train_idx)
    x_all = np.concatenate([b["X"].numpy() for b in batches])
    expected = a.X[np.sort(ref.train_idx)].toarray()
    assert sorted(map(tuple, x_all)) == sorted(map(tuple, expected))  # the same cells, shuffled


def test_counts_dataset_dense_and_csr_give_the_same_minibatch(small_adata):
    from pyro_vmm.scvi._data import CountsDataset

    batch = small_adata.obs["batch"].cat.codes.to_numpy().reshape(-1, 1)
    dense = CountsDataset(small_adata.X, batch)
    csr = CountsDataset(small_adata.X, batch, max_dense_bytes=0)
    assert dense.dense and not csr.dense and len(dense) == len(csr) == small_adata.n_obs
    idx = torch.tensor([7, 0, 3])
    a, b = dense[idx], csr[idx]
    torch.testing.assert_close(a["X"], b["X"])
    torch.testing.assert_close(a["X"], torch.as_tensor(small_adata.X[[7, 0, 3]].toarray(), dtype=torch.float32))
    torch.testing.assert_close(a["batch"], b["batch"])
    # the in-memory minibatch carries its non-zero positions, as torch.nonzero finds them
    torch.testing.assert_close(a["nonzero"], torch.stack(torch.nonzero(a["X"], as_tuple=True)))


def test_minibatch_nonzero_positions_skip_explicit_zeros_and_empty_rows():
    from scipy import sparse as sp

    from pyro_vmm.scvi._data import CountsDataset

    x = np.array([[0, 2, 0, 1], [0, 0, 0, 0], [5, 0, 0, 3], [0, 0, 7, 0]], dtype=np.float32)
    stored = sp.csr_matrix(x)
    stored.data[0] = 0.0  # an explicit zero stored in the CSR matrix
    dense_in = x.copy()
    dense_in[0, 1] = 0.0
    for counts in (stored, dense_in):
        ds = CountsDataset(counts, np.zeros((4, 1)))
        assert ds.dense
        for idx in ([3, 1, 0, 2], [1], [2, 2]):
            mb = ds[torch.tensor(idx)]
            torch.testing.assert_close(mb["nonzero"], torch.stack(torch.nonzero(mb["X"], as_tuple=True)))
    args, kwargs = VMMSCVIModule._get_fn_args_from_batch(mb)
    assert len(args) == 2 and set(kwargs) == {"nonzero"}
    assert VMMSCVIModule._get_fn_args_from_batch({"X": mb["X"], "batch": mb["batch"]})[1] == {}


def test_model_with_given_nonzero_positions_gives_the_same_elbo(small_adata):
    from pyro.infer import TraceMeanField_ELBO

    x = torch.as_tensor(small_adata.X[:30, :50].toarray(), dtype=torch.float32)
    batch = torch.as_tensor(small_adata.obs["batch"].cat.codes.to_numpy()[:30].astype(np.int64)).reshape(-1, 1)
    m = _random_module("zinb")
    elbo = TraceMeanField_ELBO()
    losses = []
    for kwargs in ({}, {"nonzero": torch.nonzero(x, as_tuple=True)}):
        pyro.set_rng_seed(3)
        losses.append(elbo.differentiable_loss(m.model, m.guide, x, batch, **kwargs))
    torch.testing.assert_close(losses[0], losses[1])


def test_sampler_drops_a_trailing_single_cell_only_when_asked():
    assert [len(i) for i in MinibatchSampler(129, 64, shuffle=False, drop_singleton=True)] == [64, 64]
    assert len(MinibatchSampler(129, 64, shuffle=False, drop_singleton=True)) == 2
    assert [len(i) for i in MinibatchSampler(129, 64, shuffle=False)] == [64, 64, 1]
    assert len(MinibatchSampler(130, 64, shuffle=True, drop_singleton=True)) == 3


# ------------------------------------------------------------------------------------------------ the model class
def test_train_latent_clusters_save_load_roundtrip(trained_vmm, tmp_path, monkeypatch):
    model = trained_vmm
    n = model.adata.n_obs
    z = model.get_latent_representation()
    probs = model.get_cluster_probabilities()
    assign = model.get_cluster_assignments()
    assert z.shape == (n, 4) and probs.shape == (n, 8) and assign.shape == (n,)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(model.get_cluster_assignments(all_components=True), probs.argmax(1))
    # the final clusters: each cell's most probable kept component, mapped to its (merged) cluster 0, 1, ...
    cluster_of = model.cluster_of_component_
    kept = np.flatnonzero(cluster_of >= 0)
    np.testing.assert_array_equal(assign, cluster_of[kept[probs[:, kept].argmax(1)]])
    assert sorted(np.unique(assign)) == list(range(cluster_of.max() + 1))
    assert 1 <= model.n_utilized_clusters() == len(np.unique(assign)) <= 8
    hist = model.history
    for key in ("elbo_train", "elbo_validation", "em_loss_train", "utilized_clusters_validation"):
        assert len(hist[key]) == 2 and hist[key].dtypes.iloc[0].kind == "f", key
    assert np.isfinite(model.get_elbo())

    model.save(tmp_path / "m", save_anndata=False)
    with pytest.raises(ValueError, match="already exists"):
        model.save(tmp_path / "m")

    def no_training(*a, **k):
        raise AssertionError("load must not train")

    monkeypatch.setattr(VMMSCVI, "train", no_training)
    loaded = VMMSCVI.load(tmp_path / "m", adata=model.adata, accelerator="cpu")
    assert loaded.module.device.type == "cpu"
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    np.testing.assert_array_equal(loaded.get_cluster_probabilities(), probs)
    np.testing.assert_array_equal(loaded.get_cluster_assignments(), assign)
    for (k1, v1), (k2, v2) in zip(model.module.state_dict().items(), loaded.module.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    assert len(loaded.history["elbo_train"]) == 2


def test_subset_indices_and_new_adata(trained_vmm):
    model = trained_vmm
    z = model.get_latent_representation()
    idx = np.array([5, 0, 17])
    np.testing.assert_allclose(model.get_latent_representation(indices=idx), z[idx], rtol=1e-5, atol=1e-6)
    other = model.adata[::2].copy()
    np.testing.assert_allclose(model.get_latent_representation(other), z[::2], rtol=1e-5, atol=1e-6)


def test_give_mean_false_draws_differ_and_average_to_the_mean(trained_vmm):
    """SCVI's getter arguments: a posterior draw per call, ``return_dist`` the posterior's mean and variance."""
    model = trained_vmm
    mean = model.get_latent_representation()
    loc, var = model.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(loc, mean, rtol=1e-6, atol=1e-6)
    assert var.shape == mean.shape and (var > 0).all()
    draws = np.stack([model.get_latent_representation(give_mean=False, batch_size=128) for _ in range(300)])
    assert not np.array_equal(draws[0], draws[1])
    sem = np.sqrt(var / len(draws))
    assert (np.abs(draws.mean(0) - mean) < 5 * sem + 1e-6).mean() > 0.99
    np.testing.assert_allclose(draws.var(0).mean(), var.mean(), rtol=0.1)

    at_mean = model.get_cluster_probabilities()
    p1 = model.get_cluster_probabilities(give_mean=False, mc_samples=1)
    p2 = model.get_cluster_probabilities(give_mean=False, mc_samples=1)
    assert not np.allclose(p1, p2) and np.allclose(p1.sum(1), 1.0, atol=1e-5)
    # the average over draws is E_q[q(c | z)]: the mean of q(c | z) at draws of z
    averaged = model.get_cluster_probabilities(give_mean=False, mc_samples=300)
    prior, enc = model.module.prior, model.module.pseudo_posterior
    with torch.no_grad():
        by_hand = np.mean([prior.cluster_probs(torch.as_tensor(d), enc).numpy() for d in draws], axis=0)
    assert np.abs(averaged - by_hand).max() < 0.15 and np.abs(averaged - by_hand).mean() < 0.01
    np.testing.assert_allclose(averaged.sum(1), 1.0, atol=1e-5)
    assert not np.allclose(averaged, at_mean, atol=1e-3)
    np.testing.assert_array_equal(model.get_cluster_assignments(), model.clusters_from_probabilities(at_mean))


@pytest.mark.parametrize("prior", ["normal", "vampprior", "gmm"])
def test_every_prior_trains(small_adata, prior):
    a = _setup(small_adata)
    model = VMMSCVI(a, prior=prior, seed=1, **TINY)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.train(max_epochs=1, seed=1, n_epochs_kl_warmup=None, **TRAIN)  # (warm-up: no KL gradient in epoch 0)
    after = model.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "encoder.fc_layers.Layer 0.0.weight" in changed and "px_r" in changed
    prior_keys = {k for k in before if k.startswith("prior.")}
    if prior in ("gmm", "vampprior"):
        assert prior_keys and prior_keys <= changed  # EM (gmm) / VI (vampprior pseudo-inputs) moved them
    if prior == "gmm":
        assert "em_loss_train" in model.history
    probs = model.get_cluster_probabilities()
    assert probs.shape == (a.n_obs, 1 if prior == "normal" else 8)
    assert np.isfinite(model.history["elbo_validation"].to_numpy()).all()


def test_same_seed_same_parameters(small_adata):
    a = _setup(small_adata)
    states = []
    for _ in range(2):
        model = VMMSCVI(a, prior="vmm", seed=4, **TINY)
        init = {k: v.clone() for k, v in model.module.state_dict().items()}
        model.train(max_epochs=1, seed=4, **TRAIN)
        states.append((init, model.module.state_dict(), model.history["elbo_train"].to_numpy()))
    (i1, t1, h1), (i2, t2, h2) = states
    assert all(torch.equal(i1[k], i2[k]) for k in i1)
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    np.testing.assert_array_equal(h1, h2)
    assert not all(torch.equal(i1[k], t1[k]) for k in i1)  # it did train
    other = VMMSCVI(a, prior="vmm", seed=5, **TINY).module.state_dict()
    assert not torch.equal(i1["prior.pseudo_inputs_unconstrained"], other["prior.pseudo_inputs_unconstrained"])
    assert not torch.equal(i1["mean_encoder.weight"], other["mean_encoder.weight"])


def test_construction_refuses_no_components_and_keeps_the_global_rng(small_adata):
    """The one construction path (``PyroVMMModel._init_module``): K >= 1, and a seeded model draws its weights and
    pseudo-input cells without moving torch's or NumPy's global random state."""
    a = _setup(small_adata)
    with pytest.raises(ValueError, match="n_clusters must be >= 1"):
        VMMSCVI(a, prior="vmm", n_clusters=0, n_latent=4)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    model = VMMSCVI(a, prior="vmm", seed=3, **TINY)
    assert torch.equal(torch_state, torch.get_rng_state())
    np.testing.assert_array_equal(np_state, np.random.get_state()[1])
    assert model.module.prior.pseudo_inputs.shape[0] == TINY["n_clusters"]


def test_tracked_training_clusters_and_tracking_changes_nothing_else(small_adata):
    """track_utilized_clusters logs the count of clusters hit by the EM-step samples, from the EM step's own pass,
    and leaves the trained parameters exactly as without tracking."""
    a = _setup(small_adata)
    runs = []
    for track in (False, True):
        model = VMMSCVI(a, prior="vmm", seed=2, **TINY)
        model.train(max_epochs=2, seed=2, plan_kwargs=dict(track_utilized_clusters=track), **TRAIN)
        runs.append(model)
    plain, tracked = runs
    used = tracked.history["utilized_clusters_train"].to_numpy().ravel()
    assert "utilized_clusters_train" not in plain.history
    assert len(used) == 2 and np.all((used >= 1) & (used <= TINY["n_clusters"]))
    s1, s2 = plain.module.state_dict(), tracked.module.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_plan_steps_own_disjoint_parameters(small_adata, monkeypatch):
    """Inside Lightning: the VI step leaves prior parameters alone, the EM step leaves networks (and BN) alone."""
    import lightning.pytorch as pl

    from pyro_vmm.infer import AlternatingSVI

    a = _setup(small_adata)
    model = VMMSCVI(a, prior="vmm", seed=2, **TINY)
    snaps: list[dict] = []

    def snapshot():
        snaps.append({k: v.detach().clone() for k, v in model.module.state_dict().items()})

    original = AlternatingSVI.em_loss_and_assignments_at

    def em_loss_and_assignments_at(self, z, assignments=True):
        snapshot()  # after the VI step, before the EM step
        return original(self, z, assignments)

    class Snap(pl.Callback):
        def on_train_batch_start(self, *args):
            snapshot()

        def on_train_batch_end(self, *args):
            snapshot()

    monkeypatch.setattr(AlternatingSVI, "em_loss_and_assignments_at", em_loss_and_assignments_at)
    model.train(max_epochs=1, seed=2, callbacks=[Snap()], **TRAIN)
    n_batches = len(snaps) // 3
    assert n_batches >= 3 and len(snaps) == 3 * n_batches
    assert model.trainer.global_step == n_batches  # the EM optimiser step is not counted
    em_keys = {k for k in snaps[0] if k.startswith("prior.")}
    net_keys = set(snaps[0]) - em_keys
    for i in range(n_batches):
        s0, s1, s2 = snaps[3 * i : 3 * i + 3]
        assert all(torch.equal(s0[k], s1[k]) for k in em_keys)  # VI step: prior untouched
        assert all(torch.equal(s1[k], s2[k]) for k in net_keys)  # EM step: networks and BN buffers untouched
        assert not torch.equal(s0["mean_encoder.weight"], s1["mean_encoder.weight"])
        assert not torch.equal(s1["prior.logits_unconstrained"], s2["prior.logits_unconstrained"])


def test_clear_errors(small_adata):
    a = _setup(small_adata)
    with pytest.raises(ValueError, match="unknown prior"):
        VMMSCVI(a, prior="dirichlet", **TINY)
    with pytest.raises(ValueError, match="gene_likelihood"):
        VMMSCVI(a, prior="normal", gene_likelihood="poisson", **TINY)
    model = VMMSCVI(a, prior="normal", **TINY)
    with pytest.raises(ValueError, match="no validation cells"):
        model.train(max_epochs=1, train_size=1.0, early_stopping=True, enable_progress_bar=False)
    with pytest.raises(RuntimeError, match="train"):
        model.get_latent_representation()


def test_zero_epochs_are_refused_and_duplicated_cell_names_warn_with_the_fix(small_adata):
    from pyro_vmm.validation import InputWarning

    model = VMMSCVI(_setup(small_adata), prior="normal", **TINY)
    with pytest.raises(ValueError, match="max_epochs must be >= 1, got 0"):
        model.train(max_epochs=0, **TRAIN)
    assert not model.is_trained_
    dup = small_adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own warning
        dup.obs_names = np.r_[dup.obs_names[:-2], dup.obs_names[:2]]
    with pytest.warns(InputWarning, match=r"2 duplicated cell name.*Fix: adata\.obs_names_make_unique\(\)"):
        VMMSCVI.setup_anndata(dup, batch_key="batch")


# ------------------------------------------------------------------------------------------------ PPC
def test_posterior_predictive_is_not_the_observed_data(trained_vmm):
    model = trained_vmm
    observed = model.adata.X.toarray()
    rep = model.posterior_predictive_sample(n_samples=3)
    assert rep.shape == (model.adata.n_obs, model.adata.n_vars, 3)
    dense = _dense(rep)
    assert (dense >= 0).all() and np.array_equal(dense, np.round(dense))
    for s in range(3):
        assert not np.array_equal(dense[..., s], observed)
    assert not np.array_equal(dense[..., 0], dense[..., 1])
    one = model.posterior_predictive_sample(indices=[0, 1, 2], n_samples=1, gene_list=list(model.adata.var_names[:5]))
    assert one.shape == (3, 5)


def test_posterior_predictive_uses_x_only_through_guide_and_library():
    torch.manual_seed(0)
    m = VMMSCVIModule(12, 2, n_latent=2, n_hidden=8, prior="normal")
    x1 = torch.poisson(torch.full((6, 12), 3.0))
    x2 = x1.flip(-1)  # other counts, same library sizes
    b = torch.zeros(6, 1, dtype=torch.long)
    fixed = m.encode(x1, b)
    m.encode = lambda x, batch_index: fixed  # q(z|x) no longer looks at x
    torch.manual_seed(3)
    r1 = m.posterior_predictive(x1, b, n_samples=4)
    torch.manual_seed(3)
    r2 = m.posterior_predictive(x2, b, n_samples=4)
    assert r1.shape == (6, 12, 4)
    torch.testing.assert_close(r1, r2)


def test_scvi_criticism_runs_and_calibration_is_per_model(trained_vmm):
    from scvi.criticism import PosteriorPredictiveCheck

    from pyro_vmm.ppc import calibration_error

    model = trained_vmm
    ppc = PosteriorPredictiveCheck(model.adata, {"vmm": model, "vmm_again": model}, n_samples=4)
    assert ppc.samples_dataset["vmm"].shape == (model.adata.n_obs, model.adata.n_vars, 4)
    table = calibration_error(ppc)
    assert list(table.columns) == ["vmm", "vmm_again"] and np.isfinite(table.to_numpy()).all()
    assert "calibration" in ppc.metrics


def test_calibration_error_math():
    from pyro_vmm.ppc import calibration_error, interval_coverage_error

    rng = np.random.default_rng(0)
    samples = rng.normal(size=(400, 30, 200))
    calibrated = rng.normal(size=(400, 30))
    shifted = calibrated + 3.0
    good = interval_coverage_error(samples, calibrated)
    bad = interval_coverage_error(samples, shifted)
    assert good < 1e-3 < 0.5 < bad
    # hand example: one entry, samples 0..10, quantiles (0.1, 0.9) -> interval [1, 9]
    s = np.arange(11.0).reshape(1, 1, 11)
    assert interval_coverage_error(s, np.array([[5.0]]), [0.1, 0.9]) == pytest.approx((1 - 0.8) ** 2)
    assert interval_coverage_error(s, np.array([[10.0]]), [0.1, 0.9]) == pytest.approx((0 - 0.8) ** 2)
    table = calibration_error({"good": samples, "bad": samples + 3.0}, observed=calibrated)
    assert table.loc["features", "good"] == pytest.approx(good)
    assert table.loc["features", "bad"] == pytest.approx(interval_coverage_error(samples + 3.0, calibrated))
    with pytest.raises(ValueError, match="pairs"):
        interval_coverage_error(samples, calibrated, [0.1, 0.5, 0.9])


def test_to_arviz(trained_vmm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    from pyro_vmm.ppc import to_arviz

    model = trained_vmm
    idata = to_arviz(model, n_samples=5, statistics=("mean", "zero_fraction", "library_size"))
    assert {"posterior_predictive", "observed_data"} <= set(idata.groups())
    assert idata.posterior_predictive["zero_fraction"].shape == (1, 5, model.adata.n_vars)
    assert idata.posterior_predictive["library_size"].shape == (1, 5, model.adata.n_obs)
    observed = model.adata.X.toarray()
    np.testing.assert_allclose(idata.observed_data["zero_fraction"].values, (observed == 0).mean(0))
    np.testing.assert_allclose(idata.observed_data["mean"].values, observed.mean(0), rtol=1e-6)
    az.plot_ppc(idata, var_names=["zero_fraction"], num_pp_samples=5)
    az.plot_bpv(idata, var_names=["mean"], kind="t_stat", t_stat="median")
    import matplotlib.pyplot as plt

    plt.close("all")
    with pytest.raises(ValueError, match="unknown statistics"):
        to_arviz(model, n_samples=1, statistics=("skewness",))


def test_query_and_load_refuse_other_genes_and_corrupt_files(trained_vmm, small_adata, tmp_path):
    """scvi-tools only compares the number of genes: a reordered query must not be read gene-by-position."""
    from pyro_vmm.validation import InputError

    model = trained_vmm
    reordered = small_adata[:, ::-1].copy()
    with pytest.raises(InputError, match=r"in a different order.*Fix: VMMSCVI\.prepare_query_anndata\(adata, model\)"):
        model.get_latent_representation(reordered)
    fewer = small_adata[:, :-3].copy()
    with pytest.raises(InputError, match="3 of the model's genes are missing from the query AnnData"):
        model.get_latent_representation(fewer)
    np.testing.assert_array_equal(  # the model's own genes, as a new object, still work
        model.get_latent_representation(_setup(small_adata)), model.get_latent_representation()
    )
    model.save(str(tmp_path / "m"), overwrite=True)
    with pytest.raises(InputError, match="the AnnData given to load has the model.s 200 genes but in a different order"):
        VMMSCVI.load(str(tmp_path / "m"), adata=_setup(small_adata[:, ::-1].copy()))
    (tmp_path / "m" / "model.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="cannot read the saved model .*Fix: save the model again"):
        VMMSCVI.load(str(tmp_path / "m"), adata=_setup(small_adata))
    torch.save({"something": "else"}, tmp_path / "m" / "model.pt")
    with pytest.raises(InputError, match="is not a saved scvi-tools model"):
        VMMSCVI.load(str(tmp_path / "m"), adata=_setup(small_adata))
    with pytest.raises(InputError, match="no saved model at"):
        VMMSCVI.load(str(tmp_path / "nowhere"), adata=_setup(small_adata))


def test_query_batches_labels_and_counts_are_checked(trained_vmm, small_adata):
    """A query must hold raw counts and only the model's batches (clear errors otherwise); new label categories and
    copies of the training AnnData are fine (labels are carried along, never used)."""
    from pyro_vmm.validation import InputError

    model = trained_vmm
    ref = model.get_latent_representation()
    relabelled = small_adata.copy()
    relabelled.obs["cell_type"] = relabelled.obs["cell_type"].astype(str).replace({"B": "Plasma"}).astype("category")
    np.testing.assert_array_equal(model.get_latent_representation(relabelled), ref)
    copy = model.adata.copy()  # carries the training AnnData's scvi uuid
    copy.obs["cell_type"] = copy.obs["cell_type"].astype(str).replace({"B": "Plasma"}).astype("category")
    np.testing.assert_array_equal(model.get_cluster_assignments(copy), model.get_cluster_assignments())

    new_batch = small_adata.copy()
    new_batch.obs["batch"] = new_batch.obs["batch"].astype(str).replace({"CTRL": "donor3"}).astype("category")
    with pytest.raises(InputError, match=r"not trained on: 'donor3'.*model's batches: 'CTRL', 'STIM'.*Fix:"):
        model.get_latent_representation(new_batch)
    no_batch = small_adata.copy()
    del no_batch.obs["batch"]
    with pytest.raises(InputError, match=r"no adata.obs\['batch'\] column.*adata.obs\['batch'\] = 'CTRL'"):
        model.get_cluster_probabilities(no_batch)
    no_labels = small_adata.copy()
    del no_labels.obs["cell_type"]
    with pytest.raises(InputError, match="labels_key the model was set up with.*any value will do"):
        model.get_latent_representation(no_labels)
    lognorm = small_adata.copy()
    lognorm.X = np.log1p(_dense(lognorm.X))
    with pytest.raises(InputError, match="non-integer"):
        model.get_latent_representation(lognorm)


def test_a_second_train_call_trains_in_training_mode(small_adata):
    """scvi-tools puts the module in eval mode after training (and after load); Lightning >= 2.2 keeps modes as it
    finds them, so continuing to train must switch BatchNorm and dropout back to training behaviour."""
    import lightning.pytorch as pl

    class Modes(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[bool] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(all(m.training for m in pl_module.module.modules()))

    model = VMMSCVI(_setup(small_adata), prior="vmm", seed=0, **TINY)
    model.train(max_epochs=1, seed=0, **TRAIN)
    assert not model.module.training  # scvi-tools' TrainRunner leaves it in eval mode
    modes = Modes()
    model.train(max_epochs=1, seed=0, callbacks=[modes], **TRAIN)
    assert modes.seen and all(modes.seen)


# ------------------------------------------------------------------------------------ evidence: marginal log-likelihood
def test_log_weights_equal_pyro_model_and_guide_traces(trained_vmm):
    """log w = log p(x|z) + log p(z) - log q(z|x) per cell, computed by Pyro from the model and guide programs."""
    from pyro import poutine

    from pyro_vmm.utils import eval_mode

    module = trained_vmm.module
    x, b = next(trained_vmm._minibatches(batch_size=50))
    torch.manual_seed(7)
    log_w, log_px = module.log_weights(x, b, 1)
    torch.manual_seed(7)
    with torch.no_grad(), eval_mode(module):
        guide = poutine.trace(module.guide).get_trace(x, b)
        model = poutine.trace(poutine.replay(module.model, trace=guide)).get_trace(x, b)
    guide.compute_log_prob()
    model.compute_log_prob()
    site = {name: tr.nodes[name]["unscaled_log_prob"] for name, tr in (("x", model), ("z", guide))}
    expected = site["x"] + model.nodes["z"]["unscaled_log_prob"] - site["z"]
    assert log_w.shape == (1, 50)
    torch.testing.assert_close(log_w[0], expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(log_px[0], site["x"], rtol=1e-5, atol=1e-3)
    # the prior term is the VMM mixture, not N(0, I)
    standard = dist.Normal(0.0, 1.0).expand([module.n_latent]).to_event(1)
    assert not torch.allclose(model.nodes["z"]["unscaled_log_prob"], standard.log_prob(model.nodes["z"]["value"]))


def test_marginal_ll_is_the_iwae_estimate_and_rises_with_samples(trained_vmm):
    model, module = trained_vmm, trained_vmm.module
    x, b = next(model._minibatches(batch_size=40))
    torch.manual_seed(3)
    log_w = module.log_weights(x, b, 64)[0]
    torch.manual_seed(3)
    iwae = module.marginal_ll(x, b, n_samples=64, n_samples_per_pass=64)
    torch.testing.assert_close(iwae, torch.logsumexp(log_w, 0) - np.log(64), rtol=1e-6, atol=1e-4)
    assert (iwae >= log_w.mean(0) - 1e-4).all()  # Jensen, cell by cell
    torch.manual_seed(0)
    per_cell = model.get_marginal_ll(n_mc_samples=200, n_mc_samples_per_pass=30, return_mean=False, batch_size=128)
    one = np.mean([model.get_marginal_ll(n_mc_samples=1) for _ in range(5)])  # a one-sample ELBO per cell
    assert per_cell.shape == (model.adata.n_obs,) and np.isfinite(per_cell).all()
    assert per_cell.mean() > one + 1.0  # the IWAE bound tightens well above the ELBO
    assert one == pytest.approx(model.get_elbo(), abs=1.0)  # S = 1 is the ELBO (Pyro's estimate; MC noise ~0.2)
    elbo_cells = model.get_elbo(return_mean=False)  # scvi-tools' sign: the ELBO, below log p(x) (higher is better)
    assert elbo_cells.shape == (model.adata.n_obs,) and elbo_cells.mean() == pytest.approx(one, abs=1.0)
    assert model.get_elbo() < per_cell.mean() < 0
    idx = np.array([3, 0, 9])
    assert model.get_marginal_ll(indices=idx, n_mc_samples=10, return_mean=False).shape == (3,)
    rec = model.get_reconstruction_error(return_mean=False)["reconstruction_loss"]
    assert rec.shape == (model.adata.n_obs,) and (rec > 0).all()
    assert model.get_reconstruction_error()["reconstruction_loss"] < -one  # -E log p(x|z) < -ELBO: the KL is > 0
    with pytest.raises(ValueError, match="n_samples"):
        module.marginal_ll(x, b, n_samples=0)


def test_merge_moves_run_at_their_epochs_and_leave_one_component_per_cluster(small_adata):
    """``merge_at=(0.5,)`` of 4 epochs: one move at the end of epoch 2; afterwards only the kept components carry
    weight, and the final clusters are made of them.  ``merge_at=None`` runs none (the paper's algorithm)."""
    a = _setup(small_adata)
    model = VMMSCVI(a, prior="vmm", seed=0, **TINY)
    model.train(max_epochs=4, seed=0, merge_at=(0.5,), **TRAIN)
    assert [epoch for epoch, _ in model.merge_moves_] == [2]
    pi = torch.softmax(model.module.prior.logits, -1).detach().numpy()
    carrying = np.flatnonzero(pi > 1e-9)
    assert carrying.size <= model.merge_moves_[0][1]
    assert set(np.flatnonzero(model.cluster_of_component_ >= 0)) <= set(carrying)
    plain = VMMSCVI(a, prior="vmm", seed=0, **TINY)
    plain.train(max_epochs=4, seed=0, merge_at=None, **TRAIN)
    assert plain.merge_moves_ == []
    assert (torch.softmax(plain.module.prior.logits, -1) > 1e-9).all()
    with pytest.raises(ValueError, match="merge_at"):
        plain.train(max_epochs=4, seed=0, merge_at=(0.0,), **TRAIN)
