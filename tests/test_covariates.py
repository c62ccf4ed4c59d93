"""Covariates in ``VMMSCVI.setup_anndata`` (``categorical_covariate_keys``, ``continuous_covariate_keys``,
``size_factor_key``), as ``scvi.model.SCVI`` takes them: registered, used by the decoder (and the encoder with
``encode_covariates=True``), carried through save/load and query mapping, and checked on input."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("scvi")

from _data import kang_subset

from pyro_vmm.scvi import VMMSCVI
from pyro_vmm.validation import InputError

SMALL = {"n_latent": 5, "n_hidden": 32, "n_clusters": 6}
TRAIN = {"batch_size": 64, "enable_progress_bar": False, "early_stopping": False}


def _simulated(n: int = 400, g: int = 40, seed: int = 0) -> anndata.AnnData:
    """Counts whose expression depends strongly on a continuous covariate ``c ~ N(0, 1)``: 3 cell types,
    :math:`\\log \\mu_{ng} = b_g + t_{\\mathrm{type}(n), g} + \\beta_g c_n` with :math:`|\\beta_g| = 1.5`."""
    rng = np.random.default_rng(seed)
    types = rng.integers(3, size=n)
    c = rng.normal(size=n)
    log_mu = rng.normal(1.0, 0.5, g) + rng.normal(0, 1.0, (3, g))[types] + np.outer(c, rng.choice([-1.5, 1.5], g))
    x = rng.poisson(np.exp(log_mu)).astype(np.float32)
    a = anndata.AnnData(X=x, obs=pd.DataFrame({"c": c, "noise": rng.normal(size=n)}, index=[f"c{i}" for i in range(n)]))
    a.var_names = [f"g{j}" for j in range(g)]
    return a[x.sum(1) > 0].copy()


def test_a_decoder_that_ignores_a_strong_covariate_fits_worse():
    a = _simulated()
    elbos = {}
    for key in ("c", "noise"):  # the true covariate vs a covariate of pure noise (same model size)
        VMMSCVI.setup_anndata(a, continuous_covariate_keys=[key])
        model = VMMSCVI(a, seed=0, n_latent=2, n_hidden=32, n_clusters=6)
        assert model.module.decoder.px_decoder.fc_layers[0][0].in_features == 2 + 1
        model.train(max_epochs=40, seed=0, train_size=1.0, n_epochs_kl_warmup=None, **TRAIN)  # full KL: a fair ELBO
        torch.manual_seed(0)
        elbos[key] = np.mean([model.get_elbo() for _ in range(5)])
    # measured: ELBO with c about 10 nats per cell above the one with noise
    assert elbos["c"] > elbos["noise"] + 3.0, elbos


def _identical_models(a, **setup):
    VMMSCVI.setup_anndata(a, **setup)
    model = VMMSCVI(a, seed=0, **SMALL)
    model.is_trained_ = True
    return model


def test_size_factors_are_the_library_size():
    a = _simulated(n=120)
    total = np.asarray(a.X.sum(1)).ravel()
    a.obs["sf_same"] = total
    a.obs["sf_big"] = 20.0 * total
    plain = _identical_models(a)
    same = _identical_models(a, size_factor_key="sf_same")
    big = _identical_models(a, size_factor_key="sf_big")

    def recon(m):
        torch.manual_seed(1)
        return m.get_reconstruction_error(return_mean=False)["reconstruction_loss"]

    np.testing.assert_allclose(recon(same), recon(plain), rtol=1e-5)  # sf = total count: the same likelihood
    assert recon(big).mean() > recon(plain).mean() + 10.0  # 20x the counts expected: the cells fit worse
    torch.manual_seed(2)
    rate = big.get_normalized_expression(library_size="latent", return_numpy=True)
    np.testing.assert_allclose(rate.sum(1), a.obs["sf_big"].to_numpy(), rtol=1e-4)  # mu = sf * rho


@pytest.fixture(scope="module")
def kang_donor(shared_data):
    a = kang_subset(shared_data / "scrna" / "kang_ifnb_2800.h5ad")
    rng = np.random.default_rng(0)
    a.obs["donor"] = rng.choice(["d1", "d2"], a.n_obs)  # a made-up categorical covariate
    a.obs["score"] = rng.normal(size=a.n_obs)
    return a


@pytest.mark.parametrize("encode_covariates", [False, True])
def test_kang_with_a_categorical_covariate_trains_saves_loads_and_maps_a_query(kang_donor, tmp_path,
                                                                               encode_covariates):
    ctrl = (kang_donor.obs["batch"] == "CTRL").to_numpy()
    ref, query = kang_donor[ctrl].copy(), kang_donor[~ctrl].copy()
    setup = {"batch_key": "batch", "categorical_covariate_keys": ["donor"], "continuous_covariate_keys": ["score"]}
    VMMSCVI.setup_anndata(ref, **setup)
    model = VMMSCVI(ref, seed=0, encode_covariates=encode_covariates, **SMALL)
    enc_in = model.module.encoder.fc_layers[0][0].in_features
    assert enc_in == ref.n_vars + (1 + 2 if encode_covariates else 0)  # counts (+ score, donor one-hot)
    assert model.module.decoder.px_decoder.fc_layers[0][0].in_features == 5 + 1 + 2  # z, score, donor (1 batch)
    model.train(max_epochs=3, seed=0, **TRAIN)
    z = model.get_latent_representation()
    model.save(tmp_path / "ref")
    loaded = VMMSCVI.load(tmp_path / "ref", adata=ref)
    np.testing.assert_allclose(loaded.get_latent_representation(), z, atol=1e-6)

    q = VMMSCVI.load_query_data(query, tmp_path / "ref")
    assert q.adata_manager.registry["setup_args"]["categorical_covariate_keys"] == ["donor"]
    q.train(max_epochs=2, seed=0, **TRAIN)
    assert q.get_latent_representation().shape == (query.n_obs, 5)
    # the widened model (new batch columns inserted before the donor columns) maps the reference cells as before
    np.testing.assert_allclose(q.get_latent_representation(ref), z, atol=1e-5)
    np.testing.assert_allclose(q.get_cluster_probabilities(ref), model.get_cluster_probabilities(), atol=1e-5)

    new = query.copy()
    new.obs["donor"] = np.where(np.arange(new.n_obs) % 2, "d1", "d9")
    with pytest.raises(InputError, match=r"categorical covariate 'donor'.*d9"):
        VMMSCVI.load_query_data(new, model)
    with pytest.raises(InputError, match=r"'donor'.*d9"):
        model.get_latent_representation(new.copy())


def test_pseudo_inputs_get_a_soft_vector_per_covariate_and_the_continuous_mean(kang_donor):
    a = kang_donor.copy()
    VMMSCVI.setup_anndata(a, batch_key="batch", categorical_covariate_keys=["donor"],
                          continuous_covariate_keys=["score"])
    module = VMMSCVI(a, seed=0, encode_covariates=True, **SMALL).module
    raw = module.prior.pseudo_inputs
    assert raw.shape == (6, a.n_vars + 2 + 2)  # counts, batch logits, donor logits
    counts, covs = module.pseudo_counts(raw.detach())
    torch.testing.assert_close(covs[:, 0], torch.full((6,), float(a.obs["score"].mean())))
    torch.testing.assert_close(covs[:, 1:], torch.full((6, 4), 0.5))  # uniform batch and donor vectors
    assert module.pseudo_posterior(raw).mean.shape == (6, 5)


@pytest.mark.parametrize(
    ("change", "setup", "message"),
    [
        (lambda a: None, {"categorical_covariate_keys": ["donr"]}, r"categorical_covariate_keys='donr'.*donor"),
        (lambda a: a.obs.__setitem__("score", np.where(np.arange(a.n_obs) == 3, np.nan, 0.0)),
         {"continuous_covariate_keys": ["score"]}, r"'score'.*missing \(NaN\)"),
        (lambda a: a.obs.__setitem__("score", np.where(np.arange(a.n_obs) == 3, np.inf, 0.0)),
         {"continuous_covariate_keys": ["score"]}, r"'score'.*non-finite"),
        (lambda a: None, {"continuous_covariate_keys": ["donor"]}, r"'donor'.*not numeric"),
        (lambda a: a.obs.__setitem__("sf", np.where(np.arange(a.n_obs) == 3, 0.0, 1.0)),
         {"size_factor_key": "sf"}, r"'sf'.*size factor\(s\) <= 0"),
        (lambda a: None, {"categorical_covariate_keys": "donor"}, r"must be a list.*\['donor'\]"),
    ],
)
def test_covariate_keys_are_checked(kang_donor, change, setup, message):
    a = kang_donor.copy()
    change(a)
    with pytest.raises(InputError, match=message):
        VMMSCVI.setup_anndata(a, **setup)


def test_scrna_cli_takes_the_covariate_flags():
    from pyro_vmm.cli import build_parser

    args = build_parser().parse_args([
        "scrna", "--data", "x.h5ad", "--out", "o", "--categorical-covariate-keys", "donor", "tech",
        "--continuous-covariate-keys", "pct_mito", "--size-factor-key", "sf",
    ])
    assert args.categorical_covariate_keys == ["donor", "tech"]
    assert args.continuous_covariate_keys == ["pct_mito"]
    assert args.size_factor_key == "sf"


def test_backed_anndata_streams_the_covariates(kang_donor, tmp_path):
    a = kang_donor.copy()
    a.obs["sf"] = np.asarray(a.X.sum(1)).ravel() / 100.0
    setup = {"batch_key": "batch", "categorical_covariate_keys": ["donor"], "continuous_covariate_keys": ["score"],
             "size_factor_key": "sf"}
    a.write_h5ad(tmp_path / "a.h5ad")
    backed = anndata.read_h5ad(tmp_path / "a.h5ad", backed="r")
    models = []
    for data in (a, backed):
        VMMSCVI.setup_anndata(data, **setup)
        model = VMMSCVI(data, seed=0, encode_covariates=True, **SMALL)
        model.train(max_epochs=2, seed=0, datasplitter_kwargs={"block_size": 1}, **TRAIN)  # same minibatches
        models.append(model)
    # streamed minibatches carry the same covariates: the same training, the same latent
    np.testing.assert_allclose(models[1].get_latent_representation(), models[0].get_latent_representation(),
                               atol=1e-4)
