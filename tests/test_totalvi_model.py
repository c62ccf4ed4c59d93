"""``pyro_vmm.VMMTOTALVI`` on the real CITE-seq set (2 x 200 PBMCs, 14 proteins; 300 genes for speed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_vmm import VMMTOTALVI
from pyro_vmm.validation import InputError

KEY = "protein_expression"
SMALL = {"n_latent": 5, "n_hidden": 32, "n_clusters": 10, "seed": 0}


@pytest.fixture(scope="module")
def cite(shared_data):
    from pyro_vmm.data.cite import load_cite

    adata = load_cite(shared_data / "cite")
    genes = np.sort(np.argsort(-np.asarray(adata.X.sum(0)).ravel())[:300])
    return adata[:, genes].copy()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(cite):
    """One trained model per prior (3 epochs), shared by the tests below."""
    torch.set_num_threads(1)
    out = {}
    for prior in ("normal", "vmm"):
        adata = cite.copy()
        VMMTOTALVI.setup_anndata(adata, protein_expression_obsm_key=KEY, batch_key="batch")
        model = VMMTOTALVI(adata, prior=prior, **SMALL)
        model.train(max_epochs=3, batch_size=128, seed=0, enable_progress_bar=False)
        out[prior] = model
    return out


def test_setup_refuses_a_missing_obsm_key(cite):
    adata = cite.copy()
    with pytest.raises(InputError, match="protein_expression_obsm_key='proteins' is not in adata.obsm.*protein_expr"):
        VMMTOTALVI.setup_anndata(adata, protein_expression_obsm_key="proteins", batch_key="batch")


@pytest.mark.parametrize(("bad", "message"), [(-1.0, "negative"), (np.nan, "NaN")])
def test_setup_refuses_bad_protein_counts(cite, bad, message):
    adata = cite.copy()
    y = adata.obsm[KEY].copy()
    y.iloc[3, 2] = bad
    adata.obsm[KEY] = y
    with pytest.raises(InputError, match=rf"adata.obsm\['{KEY}'\] contains 1 {message}"):
        VMMTOTALVI.setup_anndata(adata, protein_expression_obsm_key=KEY, batch_key="batch")


def test_refuses_no_components(cite):
    adata = cite.copy()
    VMMTOTALVI.setup_anndata(adata, protein_expression_obsm_key=KEY, batch_key="batch")
    with pytest.raises(ValueError, match="n_clusters must be >= 1"):
        VMMTOTALVI(adata, prior="vmm", n_clusters=0)


def test_setup_registers_proteins_from_an_array_with_uns_names(cite):
    adata = cite.copy()
    adata.obsm["adt"] = adata.obsm[KEY].to_numpy()
    VMMTOTALVI.setup_anndata(adata, protein_expression_obsm_key="adt", protein_names_uns_key="protein_names",
                             batch_key="batch")
    model = VMMTOTALVI(adata, prior="normal", **SMALL)
    assert list(model.protein_names) == list(cite.uns["protein_names"])
    assert model.module.n_input_proteins == 14 and model.module.n_batch == 2


@pytest.mark.parametrize("prior", ["normal", "vmm"])
def test_trains_and_gives_latents_clusters_and_expression(trained, prior):
    model = trained[prior]
    n = model.adata.n_obs
    assert model.is_trained and len(model.history["elbo_train"]) == 3
    assert np.isfinite(model.history["elbo_train"].to_numpy()).all()
    latent = model.get_latent_representation()
    assert latent.shape == (n, 5) and np.isfinite(latent).all()
    probs = model.get_cluster_probabilities()
    assert probs.shape == (n, 10 if prior == "vmm" else 1)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    labels = model.get_cluster_assignments()
    assert labels.shape == (n,) and set(labels) <= set(range(probs.shape[1]))

    rna, protein = model.get_normalized_expression()
    assert isinstance(rna, pd.DataFrame) and rna.shape == (n, 300) and protein.shape == (n, 14)
    assert list(protein.columns) == list(model.adata.uns["protein_names"])
    assert (rna.to_numpy() > 0).all() and (protein.to_numpy() > 0).all()
    np.testing.assert_allclose(rna.sum(1), 1.0, rtol=1e-4)


def test_expression_options(trained):
    model = trained["vmm"]
    idx = np.arange(20)
    fore, with_back = (
        model.get_normalized_expression(indices=idx, n_samples=3, protein_list=["CD3", "CD19"],
                                        include_protein_background=bg, return_numpy=True)[1]
        for bg in (False, True)
    )
    assert fore.shape == (20, 2) and (with_back > 0).all()
    rna, protein = model.get_normalized_expression(indices=idx, n_samples=4, return_mean=False,
                                                   transform_batch=["pbmc_10k", "pbmc_5k"], library_size=1e4)
    assert rna.shape == (4, 20, 300) and protein.shape == (4, 20, 14)
    np.testing.assert_allclose(rna.sum(-1), 1e4, rtol=1e-3)
    with pytest.raises(ValueError, match="transform_batch 'nope'"):
        model.get_normalized_expression(indices=idx, transform_batch="nope")
    with pytest.raises(ValueError, match="protein_list"):
        model.get_normalized_expression(indices=idx, protein_list=["CD999"])


def test_ppc_and_elbo(trained):
    model = trained["vmm"]
    assert model.posterior_predictive_sample(indices=np.arange(10), n_samples=2).shape == (10, 300, 2)
    assert np.isfinite(model.get_elbo()) and np.isfinite(model.get_marginal_ll(indices=np.arange(10), n_mc_samples=5))


def test_save_load_gives_identical_latents(trained, tmp_path):
    model = trained["vmm"]
    model.save(tmp_path / "tv", overwrite=True)
    loaded = VMMTOTALVI.load(tmp_path / "tv", adata=model.adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    np.testing.assert_array_equal(loaded.get_cluster_probabilities(), model.get_cluster_probabilities())
    assert loaded.module.background_pro_alpha.shape == (14, 2)
