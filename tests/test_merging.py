"""ICL merging of mixture components into clusters (pyro_vmm.merging)."""

import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from pyro_vmm.merging import icl_merge_path, merge_components, ridgeline_ratio

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


# -- the ridgeline ratio that orders the merge path ------------------------------------------------------------------
def _ratio_on_a_line(w, m1, s1, m2, s2, n=20001):
    """The same ratio by brute force in 1-D, where the ridgeline is the segment between the two means."""
    x = np.linspace(m1, m2, n)
    f = w * np.exp(-0.5 * ((x - m1) / s1) ** 2) / s1 + (1 - w) * np.exp(-0.5 * ((x - m2) / s2) ** 2) / s2
    peaks = [i for i in range(n) if (i == 0 or f[i] >= f[i - 1]) and (i == n - 1 or f[i] >= f[i + 1])]
    if len(peaks) < 2:
        return 1.0
    a, b = sorted(sorted(peaks, key=lambda i: -f[i])[:2])
    return f[a : b + 1].min() / min(f[a], f[b])


@pytest.mark.parametrize(("w", "delta", "s2"), [(0.5, 1.9, 1.0), (0.5, 2.2, 1.0), (0.5, 3.0, 1.0), (0.3, 4.0, 0.5)])
def test_ridgeline_ratio_matches_a_brute_force_density_scan_in_one_dimension(w, delta, s2):
    ratio = ridgeline_ratio((w, 1 - w), (np.zeros(1), np.full(1, delta)), (np.eye(1), s2**2 * np.eye(1)), n_grid=2001)
    assert ratio == pytest.approx(_ratio_on_a_line(w, 0.0, 1.0, delta, s2), abs=2e-3)


def test_equal_gaussians_are_unimodal_exactly_up_to_two_standard_deviations_apart():
    """Two equal-weight, unit-variance Gaussians: one mode iff the means are at most 2 sd apart."""
    eye = np.eye(3)
    below = ridgeline_ratio((1, 1), (np.zeros(3), np.r_[1.98, 0, 0]), (eye, eye))
    above = ridgeline_ratio((1, 1), (np.zeros(3), np.r_[2.1, 0, 0]), (eye, eye))
    far = ridgeline_ratio((1, 1), (np.zeros(3), np.r_[12.0, 0, 0]), (eye, eye))
    assert below == 1.0 and 0.99 < above < 1.0 and far < 1e-6


def test_the_ridgeline_ratio_counts_the_modes_that_gradient_ascent_finds():
    """In 2-D with unequal covariances: ratio 1 iff hill-climbing from many starts finds a single mode."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(5)
    for _ in range(6):
        means = (np.zeros(2), rng.uniform(-4, 4, 2))
        covs = tuple(np.cov(rng.standard_normal((2, 6))) + 0.2 * np.eye(2) for _ in range(2))
        w = (rng.uniform(0.2, 0.8), 1.0)
        dens = [multivariate_normal(m, c) for m, c in zip(means, covs)]

        def neg(x, dens=dens, w=w):
            return -(w[0] * dens[0].pdf(x) + w[1] * dens[1].pdf(x))

        starts = rng.uniform(-6, 6, (40, 2))
        modes = [minimize(neg, s, method="Nelder-Mead", options={"xatol": 1e-7, "fatol": 1e-14}).x for s in starts]
        modes = [m for m in modes if -neg(m) > 1e-8]
        distinct = []
        for m in modes:
            if all(np.linalg.norm(m - d) > 1e-2 for d in distinct):
                distinct.append(m)
        assert (ridgeline_ratio(w, means, covs, n_grid=2001) < 1.0) == (len(distinct) > 1)


def test_small_distinct_populations_are_not_merged_before_the_pieces_of_one_large_one():
    """A large Gaussian cut in two, and two small populations far from it and from each other: the path joins the
    two halves first (one mode), and the ICL-best partition is the three populations.  Ordered by the loss of fit
    alone, the two small ones (whose merge costs few nats, being few cells) are joined first."""
    rng = np.random.default_rng(6)
    big = rng.standard_normal((1500, D))
    small_a = rng.standard_normal((30, D)) + np.r_[9.0, np.zeros(D - 1)]
    small_b = rng.standard_normal((30, D)) + np.r_[0.0, 9.0, np.zeros(D - 2)]
    z = np.concatenate([big, small_a, small_b])
    assign = np.concatenate([(big[:, 0] > 0).astype(int), np.full(30, 2), np.full(30, 3)])
    path = icl_merge_path(z, assign)
    assert sorted(map(sorted, path[1][1])) == [[0, 1], [2], [3]]
    assert merge_components(z, assign, 4).tolist() == [0, 0, 1, 2]
