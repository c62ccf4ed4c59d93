"""``VMMSCVI.from_scvi_model``: a trained ``scvi.model.SCVI``'s networks copied exactly, mismatches refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

scvi = pytest.importorskip("scvi")

from _data import kang_subset

from pyro_vmm.scvi import VMMSCVI
from pyro_vmm.validation import InputError

ARCH = {"n_latent": 5, "n_hidden": 32}


@pytest.fixture(scope="module")
def kang(shared_data):
    a = kang_subset(shared_data / "scrna" / "kang_ifnb_2800.h5ad")
    a.obs["donor"] = np.random.default_rng(0).choice(["d1", "d2", "d3"], a.n_obs)
    return a


def _scvi(a, epochs: int = 3, setup: dict | None = None, **kwargs):
    a = a.copy()
    scvi.model.SCVI.setup_anndata(a, **(setup or {"batch_key": "batch"}))
    model = scvi.model.SCVI(a, **{**ARCH, **kwargs})
    model.train(max_epochs=epochs, enable_progress_bar=False)
    return model


def _latent_before_training(model: VMMSCVI) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([model.module.latent_mean(x, b, **c).numpy() for x, b, c in model._minibatch_args()])


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"encode_covariates": True, "gene_likelihood": "nb", "setup": {"batch_key": "batch",
                                                                        "categorical_covariate_keys": ["donor"]}},
    ],
)
def test_weights_are_copied_exactly_and_train_fine_tunes(kang, kwargs):
    kwargs = dict(kwargs)
    ref = _scvi(kang, setup=kwargs.pop("setup", None), **kwargs)
    model = VMMSCVI.from_scvi_model(ref, n_clusters=8, seed=0)
    assert model.module.encode_covariates is bool(kwargs.get("encode_covariates", False))
    assert model.module.gene_likelihood == kwargs.get("gene_likelihood", "zinb")
    assert not model.is_trained_
    np.testing.assert_allclose(_latent_before_training(model), ref.get_latent_representation(), atol=1e-5)
    torch.testing.assert_close(model.module.px_r, ref.module.px_r)
    model.train(max_epochs=2, seed=0, enable_progress_bar=False, early_stopping=False)
    assert model.get_latent_representation().shape == (ref.adata.n_obs, 5)


def test_a_mismatched_scvi_is_refused_naming_the_difference(kang):
    ref = _scvi(kang, epochs=1)
    with pytest.raises(InputError, match="genes"):
        VMMSCVI.from_scvi_model(ref, adata=kang[:, :-1].copy())  # one gene fewer
    with pytest.raises(InputError, match=r"n_latent"):
        VMMSCVI.from_scvi_model(ref, n_latent=7)
    deep = _scvi(kang, epochs=1, n_layers=2)
    with pytest.raises(InputError, match=r"deeply_inject_covariates=True with n_layers=2"):
        VMMSCVI.from_scvi_model(deep)
    gene_batch = _scvi(kang, epochs=1, dispersion="gene-batch")
    with pytest.raises(InputError, match=r"dispersion='gene-batch'"):
        VMMSCVI.from_scvi_model(gene_batch)
    relabelled = kang.copy()
    relabelled.obs["batch"] = relabelled.obs["batch"].astype(str).str.lower()
    with pytest.raises(InputError, match=r"batches.*differ"):
        VMMSCVI.from_scvi_model(ref, adata=relabelled)
    untrained = scvi.model.SCVI(ref.adata, **ARCH)
    with pytest.raises(InputError, match="never trained"):
        VMMSCVI.from_scvi_model(untrained)
