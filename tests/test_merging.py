"""ICL merging of mixture components into clusters (pyro_vmm.merging)."""

import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from pyro_vmm.merging import icl_merge_path, merge_components

D = 10


def _blobs(rng, n_per, centres, scale=1.0):
    z = np.concatenate([c + scale * rng.standard_normal((n_per, D)) for c in centres])
    return z, np.repeat(np.arange(len(centres)), n_per)


def test_icl_of_the_unmerged_partition_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    z, truth = _blobs(rng, 60, [np.zeros(D), np.full(D, 4.0)])
    path = icl_merge_path(z, truth)
    n, nu = len(z), D + 2
    pooled = sum(np.cov(z[truth == k].T, bias=True) * (truth == k).sum() for k in (0, 1)) / n
    expected = 0.0
    for k in (0, 1):
        x = z[truth == k]
        scatter = np.cov(x.T, bias=True) * len(x)
        cov = (scatter + nu * pooled) / (len(x) + nu)
        expected += multivariate_normal(x.mean(0), cov).logpdf(x).sum() + len(x) * np.log(len(x) / n)
    expected -= 2 * 0.5 * (D + D * (D + 1) / 2 + 1) * np.log(n)
    assert path[0][0] == pytest.approx(expected, rel=1e-6)
    assert [len(groups) for _, groups in path] == [2, 1]  # from no merge to one cluster


def test_over_split_blobs_are_merged_back_into_the_true_clusters():
    rng = np.random.default_rng(1)
    z, truth = _blobs(rng, 150, [np.zeros(D), np.r_[8.0, np.zeros(D - 1)], np.r_[0.0, 8.0, np.zeros(D - 2)]])
    parts = KMeans(12, n_init=3, random_state=0).fit_predict(z)  # 12 components for 3 Gaussian clusters
    cluster_of = merge_components(z, parts, 12)
    assert len(np.unique(cluster_of)) == 3
    assert adjusted_rand_score(truth, cluster_of[parts]) == pytest.approx(1.0)


def test_separate_clusters_stay_separate_and_a_split_gaussian_is_rejoined():
    rng = np.random.default_rng(2)
    z, truth = _blobs(rng, 200, [np.zeros(D), np.full(D, 3.0)])
    assert len(np.unique(merge_components(z, truth, 2))) == 2
    one = z[truth == 0]
    halves = (one[:, 0] > 0).astype(int)  # one Gaussian cut in two along an axis
    assert merge_components(one, halves, 2).tolist() == [0, 0]


def test_resolution_grows_with_the_number_of_cells():
    """Two Gaussians 5 sd apart: merged from a few cells, resolved from many (the BIC penalty is per cluster, the fit
    gain per cell)."""
    rng = np.random.default_rng(3)
    centres = [np.zeros(D), np.r_[5.0, np.zeros(D - 1)]]
    n_found = []
    for n_per in (25, 2000):
        z, truth = _blobs(rng, n_per, centres)
        n_found.append(len(np.unique(merge_components(z, truth, 2))))
    assert n_found == [1, 2]


def test_clusters_are_numbered_by_size_and_unused_components_get_minus_one():
    rng = np.random.default_rng(4)
    z, truth = _blobs(rng, 100, [np.zeros(D), np.full(D, 5.0)])
    assign = np.where(truth == 0, 3, 1)  # component 3: the 100 cells of blob 0; component 1: blob 1
    z = np.concatenate([z, np.full((50, D), 5.0) + rng.standard_normal((50, D))])
    assign = np.concatenate([assign, np.ones(50, int)])  # component 1 is the larger one (150 cells)
    cluster_of = merge_components(z, assign, 5)
    assert cluster_of.tolist() == [-1, 0, -1, 1, -1]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="must be"):
        icl_merge_path(np.zeros((5, 2)), np.zeros(4, int))
