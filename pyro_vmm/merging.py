r"""From mixture components to clusters: merge the VMM's components along a modality-ordered path, scored by the
integrated completed likelihood (ICL).

A Gaussian mixture fitted to clusters that are not Gaussian (curved, skewed, heavy-tailed, as cell types are in a
learned latent space) spends several components on one cluster, and MAP-EM has no Occam factor to stop it: each
extra component raises the likelihood.  So the components are grouped into clusters afterwards, in two parts.

**Which pair to merge next: the least separated one.**  Each current cluster :math:`j` is summarised by one
Gaussian (weight :math:`w_j = N_j/N`, mean :math:`\hat\mu_j`, covariance :math:`\hat\Sigma_j`, below).  Every
critical point of the two-Gaussian density :math:`f = w_i\mathcal N(\hat\mu_i, \hat\Sigma_i) +
w_j\mathcal N(\hat\mu_j, \hat\Sigma_j)` lies on its *ridgeline* (Ray & Lindsay 2005)

.. math::
    x^*(a) = \big[(1-a)\hat\Sigma_i^{-1} + a\hat\Sigma_j^{-1}\big]^{-1}
             \big[(1-a)\hat\Sigma_i^{-1}\hat\mu_i + a\hat\Sigma_j^{-1}\hat\mu_j\big], \qquad a \in [0, 1],

so :math:`f` along :math:`x^*` shows whether the pair is one mode or two.  The *ridgeline ratio* (Hennig 2010) is
the lowest density between the two highest maxima of :math:`f(x^*(a))` over the lower of those maxima: 1 when the
pair is unimodal, near 0 when a valley of no cells separates them.  The path merges the pair of largest ratio
(ties, e.g. several unimodal pairs, broken by the least loss of completed log-likelihood), then recomputes the
ratios of the merged cluster.  The ratio does not grow with cluster size, so two small, distinct populations (a few
dozen dendritic cells and plasmacytoid DCs, say) are not merged before two overlapping large ones, as they are when
the pairs are ordered by the loss of fit alone.

**Where to stop: the largest ICL** (Biernacki, Celeux & Govaert 2000) along that path.  For a hard partition of
the latent means :math:`z_1..z_N` (dimension :math:`D`) into clusters :math:`C_1..C_J`, each one full-covariance
Gaussian,

.. math::
    \mathrm{ICL}(C_{1:J}) = \sum_j \Big[\sum_{n \in C_j} \log\mathcal N(z_n \mid \hat\mu_j, \hat\Sigma_j)
        + N_j \log\frac{N_j}{N}\Big] - \frac{J\,p}{2}\log N, \qquad p = D + \frac{D(D+1)}{2} + 1,

the completed (classification) log-likelihood with the BIC penalty: a split must buy more than
:math:`\tfrac p2 \log N` nats of fit, so clusters that are one blob in the latent space are merged, and the
resolution grows with the number of cells.  :math:`\hat\mu_j` is the mean of the cluster and
:math:`\hat\Sigma_j = (S_j + \nu\,\Sigma_{pool}) / (N_j + \nu)` the posterior mean of its covariance under a
conjugate prior of :math:`\nu = D + 2` pseudo-cells (the prior's Wishart degrees of freedom) at the pooled
within-component covariance :math:`\Sigma_{pool}` (:math:`S_j` is the cluster's scatter matrix), which keeps a
10-cell cluster in 10 dimensions from having a singular covariance.

It reads the latent means and the assignments only, never labels, and has no threshold to set.
"""

from __future__ import annotations

import numpy as np

from .defaults import assign_to, final_components

__all__ = ["cluster_components", "icl_merge_path", "merge_components", "ridgeline_ratio"]

#: points of the ridgeline grid a in [0, 1] at which the two-Gaussian density is evaluated
RIDGE_GRID = 101


def _fit_term(n: float, scatter: np.ndarray, prior: np.ndarray, nu: float, n_total: int) -> float:
    r""":math:`\sum_{n \in C} \log\mathcal N(z_n \mid \hat\mu, \hat\Sigma) + N_C \log(N_C / N)` from the cluster's
    size ``n`` and scatter matrix."""
    d = scatter.shape[0]
    cov = (scatter + nu * prior) / (n + nu)
    _, log_det = np.linalg.slogdet(cov)
    trace = float(np.trace(np.linalg.solve(cov, scatter)))
    return -0.5 * (n * (d * np.log(2 * np.pi) + log_det) + trace) + n * np.log(n / n_total)


def _merged(a: tuple, b: tuple) -> tuple:
    """Size, mean and scatter of the union of two clusters (from theirs)."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    diff = ma - mb
    return n, (na * ma + nb * mb) / n, sa + sb + np.outer(diff, diff) * (na * nb / n)


def _log_normal(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    r""":math:`\log\mathcal N(x_m \mid \mu, \Sigma)` for the rows of ``x``."""
    chol = np.linalg.cholesky(cov)
    y = np.linalg.solve(chol, (x - mean).T)
    return -0.5 * (y**2).sum(0) - np.log(np.diag(chol)).sum() - 0.5 * len(mean) * np.log(2 * np.pi)


def ridgeline_ratio(
    weights: tuple[float, float], means: tuple[np.ndarray, np.ndarray], covs: tuple[np.ndarray, np.ndarray],
    n_grid: int = RIDGE_GRID,
) -> float:
    r"""Hennig's ridgeline ratio of :math:`w_1\mathcal N(\mu_1, \Sigma_1) + w_2\mathcal N(\mu_2, \Sigma_2)`: the
    density's lowest value between its two highest maxima along the ridgeline :math:`x^*(a)` (module docstring),
    over the lower of the two maxima; 1 when the density has one maximum on the ridgeline (one mode)."""
    prec = [np.linalg.inv(c) for c in covs]
    a = np.linspace(0.0, 1.0, n_grid)[:, None, None]
    lhs = (1 - a) * prec[0] + a * prec[1]  # (n_grid, D, D)
    rhs = (1 - a[..., 0]) * (prec[0] @ means[0]) + a[..., 0] * (prec[1] @ means[1])  # (n_grid, D)
    x = np.linalg.solve(lhs, rhs[..., None])[..., 0]
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    f = np.logaddexp(np.log(w[0]) + _log_normal(x, means[0], covs[0]), np.log(w[1]) + _log_normal(x, means[1], covs[1]))
    inner = (f[1:-1] >= f[:-2]) & (f[1:-1] >= f[2:])
    peaks = np.flatnonzero(np.r_[f[0] >= f[1], inner, f[-1] >= f[-2]])
    if peaks.size < 2:
        return 1.0
    lo, hi = np.sort(peaks[np.argsort(-f[peaks])[:2]])
    return float(np.exp(f[lo : hi + 1].min() - min(f[lo], f[hi])))


def icl_merge_path(z: np.ndarray, assign: np.ndarray, nu: float | None = None) -> list[tuple[float, list[list[int]]]]:
    """The merge path: ``(ICL, groups)`` for 1 + the number of distinct ``assign`` values partitions, from no merge
    to one cluster, each step merging the pair of largest ridgeline ratio (ties: least loss of fit); ``groups`` are
    lists of the component labels found in ``assign``."""
    z = np.asarray(z, dtype=np.float64)
    assign = np.asarray(assign)
    if z.ndim != 2 or len(z) != len(assign):
        raise ValueError(f"z must be (cells, D) and assign (cells,), got {z.shape} and {assign.shape}")
    n_total, d = z.shape
    nu = float(d + 2 if nu is None else nu)
    penalty = 0.5 * (d + d * (d + 1) / 2 + 1) * np.log(n_total)
    labels = np.unique(assign)
    stats = []
    for k in labels:
        x = z[assign == k]
        mean = x.mean(0)
        stats.append((float(len(x)), mean, (x - mean).T @ (x - mean)))
    prior = sum(s[2] for s in stats) / n_total + 1e-8 * np.eye(d)
    fit = [_fit_term(n, s, prior, nu, n_total) for n, _, s in stats]
    groups: list[list[int]] = [[int(k)] for k in labels]
    size = len(labels)
    ratio = np.full((size, size), -np.inf)  # ridgeline ratio of the pair
    gain = np.full((size, size), -np.inf)  # fit after merging i and j minus fit before

    def cov(i: int) -> np.ndarray:
        return (stats[i][2] + nu * prior) / (stats[i][0] + nu)

    def score(i: int, j: int) -> None:
        merged = _merged(stats[i], stats[j])
        gain[i, j] = gain[j, i] = _fit_term(merged[0], merged[2], prior, nu, n_total) - fit[i] - fit[j]
        ratio[i, j] = ratio[j, i] = ridgeline_ratio(
            (stats[i][0], stats[j][0]), (stats[i][1], stats[j][1]), (cov(i), cov(j))
        )

    for i in range(size):
        for j in range(i + 1, size):
            score(i, j)
    alive = list(range(size))
    path = [(sum(fit) - penalty * len(alive), [g[:] for g in groups])]
    while len(alive) > 1:
        sub_ratio, sub_gain = ratio[np.ix_(alive, alive)], gain[np.ix_(alive, alive)]
        best = np.flatnonzero(sub_ratio == sub_ratio.max())  # flat indices of the pairs of largest ratio
        a, b = np.unravel_index(best[np.argmax(sub_gain.ravel()[best])], sub_ratio.shape)
        i, j = alive[min(a, b)], alive[max(a, b)]
        fit[i] = fit[i] + fit[j] + gain[i, j]
        stats[i] = _merged(stats[i], stats[j])
        groups[i] = groups[i] + groups[j]
        alive.remove(j)
        ratio[j, :] = ratio[:, j] = gain[j, :] = gain[:, j] = -np.inf
        for k in alive:
            if k != i:
                score(i, k)
        path.append((sum(fit[k] for k in alive) - penalty * len(alive), [groups[k][:] for k in alive]))
    return path


def merge_components(z: np.ndarray, assign: np.ndarray, n_components: int, nu: float | None = None) -> np.ndarray:
    """The cluster of each of ``n_components`` mixture components: the ICL-best partition of
    :func:`icl_merge_path`, clusters numbered ``0, 1, ...`` by decreasing number of cells, ``-1`` for components
    that own no cell in ``assign``."""
    assign = np.asarray(assign, dtype=np.int64)
    _, groups = max(icl_merge_path(z, assign, nu), key=lambda step: step[0])
    sizes = np.bincount(assign, minlength=n_components)
    groups = sorted(groups, key=lambda g: -sizes[g].sum())
    cluster_of = np.full(n_components, -1, dtype=np.int64)
    for c, group in enumerate(groups):
        cluster_of[group] = c
    return cluster_of


def cluster_components(z: np.ndarray, probs: np.ndarray, min_size: int) -> np.ndarray:
    r"""The cluster of each of the ``K`` mixture components (``-1``: not reported) from the cells' latent means ``z``
    (N, D) and :math:`q(c \mid z)` ``probs`` (N, K): components that are the most probable one for fewer than
    ``min_size`` cells are dropped (:func:`~pyro_vmm.defaults.final_components`), and the kept ones are merged by
    :func:`merge_components`.  The rule of the merge moves during training and of the final clusters."""
    kept = final_components(probs, min_size)
    return merge_components(z, assign_to(probs, kept), np.asarray(probs).shape[1])
