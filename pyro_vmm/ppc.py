r"""Posterior predictive checks of VMM-scVI: ArviZ adapter and a per-model calibration error.

Replicated data :math:`\tilde x^{(s)} \sim p(x \mid z^{(s)}, \ell, s)`, :math:`z^{(s)} \sim q(z \mid x)`, are compared
with the observed counts through summary statistics :math:`T` (one value per gene, or per cell):

``mean``            per-gene mean count, :math:`\frac1N\sum_n x_{ng}`
``variance``        per-gene variance (ddof 0)
``cv``              per-gene coefficient of variation, :math:`\mathrm{sd}_g / \mathrm{mean}_g` (0 where the mean is 0)
``zero_fraction``   per-gene fraction of zero counts
``library_size``    per-cell total count :math:`\sum_g x_{ng}` (the model conditions on it, so it should match)
``cell_zero_fraction``  per-cell fraction of zero counts

:func:`to_arviz` builds an ``arviz.InferenceData`` (legacy 0.23 API) whose ``posterior_predictive`` group holds
:math:`T(\tilde x^{(s)})` with dims ``(chain=1, draw=S, gene|cell)`` and whose ``observed_data`` group holds
:math:`T(x)`, so ``az.plot_ppc(idata, var_names=["zero_fraction"])`` and ``az.plot_bpv(idata, kind="t_stat")`` work.

:func:`calibration_error` is the calibration metric of ``scvi.criticism.PosteriorPredictiveCheck`` computed against
each model's own samples (scvi-tools 1.4.2 always compares with the model named ``"model1"``): for symmetric
quantile pairs :math:`(p_i, 1-p_i)` of the predictive samples of each count,

.. math:: \mathrm{CE} = \sum_i \big(\widehat{\Pr}[q_{p_i} \le x_{ng} \le q_{1-p_i}] - (1 - 2p_i)\big)^2,

the coverage :math:`\widehat{\Pr}` being the fraction of all (cell, gene) entries inside the interval.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import sparse as sp

__all__ = [
    "DEFAULT_QUANTILES",
    "STATISTICS",
    "calibration_error",
    "interval_coverage_error",
    "summary_statistics",
    "to_arviz",
]

#: scvi-tools' default quantiles for the calibration error (pairs i, len-1-i are the interval ends)
DEFAULT_QUANTILES: tuple[float, ...] = tuple(
    p / 100 for p in (2.5, 5, 7.5, 10, 12.5, 15, 17.5, 82.5, 85, 87.5, 90, 92.5, 95, 97.5)
)


def _gene_mean(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=0)


def _gene_variance(x: np.ndarray) -> np.ndarray:
    return x.var(axis=0)


def _gene_cv(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=0)
    sd = x.std(axis=0)
    return np.divide(sd, mean, out=np.zeros_like(sd), where=mean > 0)


def _gene_zero_fraction(x: np.ndarray) -> np.ndarray:
    return (x == 0).mean(axis=0)


def _cell_library_size(x: np.ndarray) -> np.ndarray:
    return x.sum(axis=1)


def _cell_zero_fraction(x: np.ndarray) -> np.ndarray:
    return (x == 0).mean(axis=1)


#: name -> (dimension, function of a dense (cells, genes) matrix)
STATISTICS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "mean": ("gene", _gene_mean),
    "variance": ("gene", _gene_variance),
    "cv": ("gene", _gene_cv),
    "zero_fraction": ("gene", _gene_zero_fraction),
    "library_size": ("cell", _cell_library_size),
    "cell_zero_fraction": ("cell", _cell_zero_fraction),
}


def _dense(x) -> np.ndarray:
    if sp.issparse(x):
        return np.asarray(x.toarray(), dtype=np.float64)
    if hasattr(x, "todense"):  # sparse.GCXS / COO
        return np.asarray(x.todense(), dtype=np.float64)
    return np.asarray(x, dtype=np.float64)


def summary_statistics(x, statistics: Sequence[str]) -> dict[str, np.ndarray]:
    """``{name: T(x)}`` for a (cells, genes) count matrix (dense, scipy sparse or ``sparse`` array)."""
    unknown = [s for s in statistics if s not in STATISTICS]
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {sorted(STATISTICS)}")
    x = _dense(x)
    return {name: STATISTICS[name][1](x) for name in statistics}


def to_arviz(
    model,
    adata=None,
    indices: Sequence[int] | None = None,
    n_samples: int = 20,
    statistics: Sequence[str] = ("mean", "zero_fraction", "cv", "library_size"),
    batch_size: int | None = None,
):
    """Posterior predictive summary statistics of a trained ``VMMSCVI`` as ``arviz.InferenceData``.

    Parameters
    ----------
    model
        A trained model with ``posterior_predictive_sample`` and a registered AnnData (``VMMSCVI``).
    adata, indices
        Cells to check (default: the model's AnnData, all cells).
    n_samples
        Number ``S`` of replicated data sets (ArviZ draws).
    statistics
        Names in :data:`STATISTICS`.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    from scvi import REGISTRY_KEYS

    adata = model._validate_anndata(adata)
    if indices is not None:
        indices = np.asarray(indices)
        indices = np.flatnonzero(indices) if indices.dtype == bool else indices
    observed = model.get_anndata_manager(adata, required=True).get_from_registry(REGISTRY_KEYS.X_KEY)
    if indices is not None:
        observed = observed[indices]
    obs_names = np.asarray(adata.obs_names if indices is None else adata.obs_names[indices])

    reps = _dense(model.posterior_predictive_sample(adata, indices=indices, n_samples=n_samples, batch_size=batch_size))
    if reps.ndim == 2:
        reps = reps[..., None]
    pp = {name: [] for name in statistics}
    for s in range(reps.shape[-1]):
        for name, value in summary_statistics(reps[..., s], statistics).items():
            pp[name].append(value)
    posterior_predictive = {name: np.stack(v)[None] for name, v in pp.items()}  # (chain=1, draw=S, dim)
    observed_data = summary_statistics(observed, statistics)
    dims = {name: [STATISTICS[name][0]] for name in statistics}
    coords = {"gene": np.asarray(adata.var_names), "cell": obs_names}
    coords = {k: v for k, v in coords.items() if any(d == [k] for d in dims.values())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return az.from_dict(
            posterior_predictive=posterior_predictive, observed_data=observed_data, dims=dims, coords=coords
        )


def interval_coverage_error(
    samples: np.ndarray, observed: np.ndarray, quantiles: Sequence[float] = DEFAULT_QUANTILES, chunk_size: int = 256
) -> float:
    """Calibration error of predictive ``samples`` (cells, genes, S) for ``observed`` (cells, genes) (see module).

    Quantiles are computed per entry over the samples (linear interpolation, as xarray's ``quantile``); cells are
    processed in chunks of ``chunk_size`` to bound memory."""
    quantiles = list(quantiles)
    if len(quantiles) % 2:
        raise ValueError(f"quantiles must come in pairs (p, 1 - p); got {len(quantiles)} values")
    samples = samples if samples.ndim == 3 else samples[..., None]
    if samples.shape[:2] != observed.shape:
        raise ValueError(f"samples {samples.shape[:2]} and observed {observed.shape} differ in (cells, genes)")
    pairs = [(i, len(quantiles) - 1 - i) for i in range(len(quantiles) // 2)]
    inside = np.zeros(len(pairs))
    for start in range(0, observed.shape[0], chunk_size):
        s = _dense(samples[start : start + chunk_size])
        o = _dense(observed[start : start + chunk_size])
        q = np.quantile(s, quantiles, axis=-1)  # (Q, cells, genes)
        for j, (lo, hi) in enumerate(pairs):
            inside[j] += np.count_nonzero((o >= q[lo]) & (o <= q[hi]))
    coverage = inside / (observed.shape[0] * observed.shape[1])
    widths = np.array([quantiles[hi] - quantiles[lo] for lo, hi in pairs])
    return float(((coverage - widths) ** 2).sum())


def calibration_error(
    ppc_or_samples, observed=None, confidence_intervals: Sequence[float] | None = None
) -> pd.DataFrame | float:
    """Calibration error per model (lower is better).

    ``ppc_or_samples`` is a ``scvi.criticism.PosteriorPredictiveCheck`` (result stored in
    ``ppc.metrics["calibration"]`` like scvi-tools, one column per model, row ``"features"``), a mapping
    ``{model_name: samples}`` with ``observed`` (returns the same DataFrame), or one samples array with ``observed``
    (returns a float).  ``confidence_intervals`` are the quantiles, in pairs (default :data:`DEFAULT_QUANTILES`)."""
    quantiles = DEFAULT_QUANTILES if confidence_intervals is None else tuple(confidence_intervals)
    if hasattr(ppc_or_samples, "samples_dataset") and hasattr(ppc_or_samples, "raw_counts"):
        ppc = ppc_or_samples
        raw = ppc.raw_counts
        raw = _dense(raw)  # densified once, as scvi-tools' own method does (slicing sparse GCXS is slow)
        table = {
            name: {"features": interval_coverage_error(_dense(ppc.samples_dataset[name].data), raw, quantiles)}
            for name in ppc.models
        }
        result = pd.DataFrame.from_dict(table)
        ppc.metrics["calibration"] = result
        return result
    if observed is None:
        raise ValueError("pass observed= (the (cells, genes) counts) with raw samples")
    if isinstance(ppc_or_samples, Mapping):
        return pd.DataFrame.from_dict(
            {name: {"features": interval_coverage_error(s, observed, quantiles)} for name, s in ppc_or_samples.items()}
        )
    return interval_coverage_error(ppc_or_samples, observed, quantiles)
