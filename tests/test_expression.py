"""Decoded expression, differential expression and cluster markers of ``VMMSCVI`` (``pyro_vmm.scvi._expression``).

Data: 300 random cells x the 200 highest-count genes of ../shared/data/scrna/kang_ifnb_2800.h5ad (2 conditions).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("scvi")

from _data import kang_subset

from pyro_vmm.scvi import VMMSCVI

SMALL = {"n_latent": 10, "n_hidden": 64, "n_clusters": 8}  # smaller networks learn too little for DE to be checked
TRAIN = {"batch_size": 64, "enable_progress_bar": False, "early_stopping": False}


@pytest.fixture(scope="module")
def kang(shared_data):
    adata = kang_subset(shared_data / "scrna" / "kang_ifnb_2800.h5ad")
    VMMSCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    return adata


@pytest.fixture(scope="module")
def model(kang):
    m = VMMSCVI(kang, prior="vmm", seed=0, **SMALL)
    m.train(max_epochs=60, seed=0, **TRAIN)  # ~6 s
    return m


def _counts(adata) -> np.ndarray:
    return np.asarray(adata.X.todense()) if hasattr(adata.X, "todense") else np.asarray(adata.X)


def _seeded(fn, seed=0, **kwargs):
    torch.manual_seed(seed)
    return fn(**kwargs)


# ------------------------------------------------------------------------------------------- normalized expression
def test_normalized_expression_shapes_sums_and_scales(model, kang):
    expr = model.get_normalized_expression()
    assert isinstance(expr, pd.DataFrame) and expr.shape == kang.shape
    assert list(expr.index) == list(kang.obs_names) and list(expr.columns) == list(kang.var_names)
    np.testing.assert_allclose(expr.sum(1), 1.0, rtol=1e-5)  # rho is a frequency vector

    f = model.get_normalized_expression
    rho = _seeded(f, return_numpy=True)
    np.testing.assert_allclose(_seeded(f, library_size=1e4, return_numpy=True), 1e4 * rho, rtol=1e-5)
    latent = _seeded(f, library_size="latent", return_numpy=True)  # mu = observed library x rho
    np.testing.assert_allclose(latent, _counts(kang).sum(1, keepdims=True) * rho, rtol=1e-5)

    genes = list(kang.var_names[[5, 0, 17]])
    sub = _seeded(f, gene_list=genes)
    assert list(sub.columns) == sorted(genes, key=list(kang.var_names).index)  # the model's gene order
    np.testing.assert_allclose(sub.to_numpy(), rho[:, [0, 5, 17]], rtol=1e-6)

    draws = _seeded(f, n_samples=3, return_mean=False)
    assert isinstance(draws, np.ndarray) and draws.shape == (3, *kang.shape)
    np.testing.assert_allclose(_seeded(f, n_samples=3, return_numpy=True), draws.mean(0), rtol=1e-5)
    assert not np.allclose(draws[0], draws[1])  # z ~ q(z | x): separate draws differ

    idx = np.arange(0, 300, 7)
    assert f(indices=idx).shape == (idx.size, kang.n_vars)
    assert _seeded(f, n_samples_overall=500, return_numpy=True).shape == (500, kang.n_vars)


def test_transform_batch_decodes_in_the_named_batch_and_averages_batches(model, kang):
    f = model.get_normalized_expression
    own = _seeded(f, return_numpy=True)
    as_ctrl = _seeded(f, transform_batch="CTRL", return_numpy=True)
    as_stim = _seeded(f, transform_batch="STIM", return_numpy=True)
    in_ctrl = (kang.obs["batch"] == "CTRL").to_numpy()
    np.testing.assert_allclose(as_ctrl[in_ctrl], own[in_ctrl], rtol=1e-6)  # same z draws, same batch
    np.testing.assert_allclose(as_stim[~in_ctrl], own[~in_ctrl], rtol=1e-6)
    assert np.abs(as_ctrl[~in_ctrl] - own[~in_ctrl]).max() > 1e-4  # the batch enters the decoder
    both = _seeded(f, transform_batch=["CTRL", "STIM"], return_numpy=True)
    np.testing.assert_allclose(both, (as_ctrl + as_stim) / 2, rtol=1e-5)


def test_expected_counts_match_the_posterior_predictive_mean():
    """NB model: E[x_rep] = l * E_q[rho], so the mean of many replicated counts must match ``library_size="latent"``
    averaged over as many z draws (Monte Carlo, per gene, summed over cells; 4 standard errors)."""
    rng = np.random.default_rng(0)
    n, g = 120, 30
    counts = rng.negative_binomial(4, 4 / (4 + rng.gamma(1.0, 3.0, size=(1, g)) * rng.uniform(0.5, 2, (n, 1))))
    counts[:, 0] += 1
    import anndata

    adata = anndata.AnnData(counts.astype(np.float32))
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(n) % 2, "a", "b"))
    VMMSCVI.setup_anndata(adata, batch_key="batch")
    m = VMMSCVI(adata, prior="normal", gene_likelihood="nb", n_latent=3, n_hidden=16, seed=0)
    m.train(max_epochs=5, seed=0, **TRAIN)
    s = 400
    expected = m.get_normalized_expression(library_size="latent", n_samples=s, return_numpy=True).sum(0)
    reps = m.posterior_predictive_sample(n_samples=s).todense().astype(np.float64)  # (n, g, s)
    totals = reps.sum(0)  # per gene and draw: sums over cells
    z = (totals.mean(1) - expected) / (totals.std(1, ddof=1) / np.sqrt(s))
    assert np.abs(z).max() < 4.0, np.abs(z).max()


def test_expression_errors_name_the_problem(model):
    with pytest.raises(ValueError, match="not a batch of this model.*'CTRL'"):
        model.get_normalized_expression(transform_batch="control")
    with pytest.raises(ValueError, match="not genes of the model"):
        model.get_normalized_expression(gene_list=["NOT_A_GENE"])
    with pytest.raises(ValueError, match="library_size"):
        model.get_normalized_expression(library_size=0)
    with pytest.raises(NotImplementedError, match="importance"):
        model.get_normalized_expression(weights="importance")
    with pytest.raises(ValueError, match=r"groupby='celltype' is not a column.*\['batch', 'cell_type'\]\."):
        model.differential_expression(groupby="celltype")


# ------------------------------------------------------------------------------------------- differential expression
def test_differential_expression_agrees_with_the_raw_fold_changes(model, kang):
    """CD14 monocytes (88 cells) against naive CD4 T cells (57): where the raw normalised means differ four-fold or
    more (and the gene is seen in >= 20 % of either group), the model's posterior LFC has the same sign; classical
    markers of either type are called DE in the right direction."""
    de = model.differential_expression(
        groupby="cell_type", group1="CD14 Mono", group2="CD4 Naive T", mode="change", silent=True
    )
    assert {"lfc_mean", "proba_de", "bayes_factor", "is_de_fdr_0.05", "raw_normalized_mean1"} <= set(de.columns)
    assert set(de.index) == set(kang.var_names)
    raw_lfc = np.log2((de["raw_normalized_mean1"] + 1e-3) / (de["raw_normalized_mean2"] + 1e-3))
    seen = np.maximum(de["non_zeros_proportion1"], de["non_zeros_proportion2"]) >= 0.2
    strong = seen & (raw_lfc.abs() >= 2)
    assert strong.sum() >= 10
    agree = np.sign(de.loc[strong, "lfc_mean"]) == np.sign(raw_lfc[strong])
    assert agree.mean() >= 0.95, de.loc[strong & ~agree, ["lfc_mean", "raw_normalized_mean1", "raw_normalized_mean2"]]
    for gene, sign in (("LYZ", 1), ("S100A8", 1), ("CCR7", -1)):  # monocyte, monocyte, naive T markers
        assert sign * de.loc[gene, "lfc_mean"] > 0.5 and de.loc[gene, "is_de_fdr_0.05"], gene


def test_cluster_markers_one_vs_rest_table(model, kang):
    obs_before = kang.obs.copy()
    markers = model.cluster_markers(n_markers=5, seed=0, silent=True)
    assert list(markers.columns[:5]) == ["cluster", "cluster_number", "n_cells", "rank", "gene"]
    pd.testing.assert_frame_equal(kang.obs, obs_before)  # nothing added to the user's AnnData

    sizes = pd.Series(model.get_cluster_assignments()).value_counts()
    number = {k: i + 1 for i, k in enumerate(sizes.index)}
    assert set(markers.attrs["skipped_clusters"]) == set(sizes.index[sizes < 10])
    assert len(markers) > 0
    for k, block in markers.groupby("cluster"):
        assert (block["cluster_number"] == number[k]).all() and (block["n_cells"] == sizes[k]).all()
        assert block["rank"].tolist() == list(range(1, len(block) + 1)) and len(block) <= 5
        assert (block["lfc_mean"] > 0).all() and (block["non_zeros_proportion1"] >= 0.1).all()
        assert block["lfc_mean"].is_monotonic_decreasing
    # the same seed gives the same table
    pd.testing.assert_frame_equal(markers, model.cluster_markers(n_markers=5, seed=0, silent=True))


def test_marker_dotplot_draws_the_markers_in_cluster_order(model, kang, tmp_path):
    from pyro_vmm.plotting import marker_dotplot

    a = kang.copy()
    a.obs["vmm_cluster"] = model.get_cluster_assignments().astype(str)
    markers = model.cluster_markers(n_markers=4, seed=0, silent=True)
    fig = marker_dotplot(a, markers, n_per_cluster=2, path=tmp_path / "markers.png")
    assert (tmp_path / "markers.png").read_bytes()[:4] == b"\x89PNG"
    ax = fig.axes[0]
    drawn = [t.get_text() for t in ax.get_xticklabels()]
    sizes = a.obs["vmm_cluster"].value_counts()
    expected = []
    for cl in sizes.index:
        picks = [g for g in markers.loc[markers["cluster"].astype(str) == cl, "gene"] if g not in expected]
        expected += picks[:2]
    assert drawn == expected
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{i + 1} ({n})" for i, n in enumerate(sizes)]
    with pytest.raises(KeyError, match="cluster_key"):
        marker_dotplot(a, markers, cluster_key="leiden")
    with pytest.raises(ValueError, match="lacks the columns"):
        marker_dotplot(a, markers.drop(columns="gene"))
