r"""From mixture components to clusters: merge the VMM's components by the integrated completed likelihood (ICL).

A Gaussian mixture fitted to clusters that are not Gaussian (curved, skewed, heavy-tailed, as cell types are in a
learned latent space) spends several components on one cluster, and MAP-EM has no Occam factor to stop it: each
extra component raises the likelihood.  So the components are grouped into clusters afterwards, by the criterion
of Biernacki, Celeux & Govaert (2000) for choosing the number of *clusters* (rather than of density components).

For a hard partition of the latent means :math:`z_1..z_N` (dimension :math:`D`) into clusters :math:`C_1..C_J`,
each modelled by one full-covariance Gaussian,

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

The search is greedy (Baudry et al. 2010's merge path): start from the components, merge the pair whose merge
loses the least completed log-likelihood, and report the partition of largest ICL along the path.  It reads the
latent means and the assignments only, never labels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["icl_merge_path", "merge_components"]


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


def icl_merge_path(z: np.ndarray, assign: np.ndarray, nu: float | None = None) -> list[tuple[float, list[list[int]]]]:
    """The greedy merge path: ``(ICL, groups)`` for 1 + the number of distinct ``assign`` values partitions, from no
    merge to one cluster; ``groups`` are lists of the component labels found in ``assign``."""
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
    gain = np.full((len(labels), len(labels)), -np.inf)  # fit after merging i and j minus fit before

    def pair_gain(i: int, j: int) -> float:
        merged = _merged(stats[i], stats[j])
        return _fit_term(merged[0], merged[2], prior, nu, n_total) - fit[i] - fit[j]

    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            gain[i, j] = gain[j, i] = pair_gain(i, j)
    alive = list(range(len(labels)))
    path = [(sum(fit) - penalty * len(alive), [g[:] for g in groups])]
    while len(alive) > 1:
        sub = gain[np.ix_(alive, alive)]
        a, b = np.unravel_index(np.argmax(sub), sub.shape)
        i, j = alive[min(a, b)], alive[max(a, b)]
        stats[i] = _merged(stats[i], stats[j])
        fit[i] = fit[i] + fit[j] + gain[i, j]
        groups[i] = groups[i] + groups[j]
        alive.remove(j)
        gain[j, :] = gain[:, j] = -np.inf
        for k in alive:
            if k != i:
                gain[i, k] = gain[k, i] = pair_gain(i, k)
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
