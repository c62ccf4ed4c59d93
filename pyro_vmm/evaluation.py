"""Evaluation of single-cell integration + clustering: clustering metrics, a Leiden baseline, scIB and tuning.

In the style of scib-metrics: one function per quantity, frozen configuration dataclasses, and orchestrators
(:func:`scib_table`, :func:`tuning_sweep`).  Heavy libraries (scanpy, scib-metrics, scvi-tools) are imported inside
the functions that need them.

- Clustering of the model's own clusters: :func:`pyro_vmm.metrics.clustering_scores` (re-exported here), the paper's
  protocol (most-probable-member accuracy, NMI merged/unmerged, ARI, utilized clusters).
- :func:`leiden_baseline`: Leiden clusters of a latent's kNN graph (igraph backend), scored by NMI/ARI vs labels --
  the usual "embed, then cluster" pipeline the VMM's built-in clustering replaces.
- :func:`scib_table`: scib-metrics' ``Benchmarker`` (bio conservation, batch correction, Total =
  0.4 * batch + 0.6 * bio, unscaled); batch metrics are switched off for single-batch data.
- :func:`knn_label_transfer` / :func:`label_transfer_scores`: labels of query cells predicted by a k-nearest-neighbour
  vote among reference cells in the latent space (reference mapping), and their accuracy / macro F1.
- :func:`pca_embedding`: the unintegrated baseline, PCA of log(1 + 1e4 * x / sum(x)).
- :func:`tuning_sweep` / :func:`select_tuning_config`: the paper's Figure-5 sweep over batch size x prior learning
  rate ratio, keeping configurations whose utilized clusters >= number of cell types.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from .metrics import ClusteringScores, clustering_scores

__all__ = [
    "ClusteringScores",
    "LabelTransfer",
    "LeidenResult",
    "ScibConfig",
    "TuningGrid",
    "clustering_scores",
    "exact_neighbors",
    "knn_label_transfer",
    "label_transfer_scores",
    "leiden_baseline",
    "leiden_clusters",
    "mark_eligible",
    "pca_embedding",
    "plot_tuning_sweep",
    "scib_table",
    "select_tuning_config",
    "tuning_sweep",
    "vmm_scvi_trial",
]

#: aggregate columns of :func:`scib_table`
AGGREGATES = ("Batch correction", "Bio conservation", "Total")


def _as_latent(latent) -> np.ndarray:
    x = np.asarray(latent, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"latent must be a 2-D (cells x dims) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("latent contains NaN or infinite values; check the model's training (loss diverged?)")
    return x


# ------------------------------------------------------------------------------------------------------- Leiden
def leiden_clusters(latent, resolution: float = 1.0, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """Leiden communities of the ``n_neighbors``-NN graph (UMAP connectivities) of ``latent``; (N,) int labels.

    scanpy's default Leiden backend needs ``leidenalg``; this uses igraph's implementation
    (``flavor="igraph"``, 2 iterations, undirected), seeded by ``seed``.
    """
    import anndata
    import scanpy as sc

    x = _as_latent(latent)
    adata = anndata.AnnData(X=np.zeros((x.shape[0], 0), dtype=np.float32), obsm={"X_latent": x})
    sc.pp.neighbors(adata, n_neighbors=min(n_neighbors, x.shape[0] - 1), use_rep="X_latent", random_state=seed)
    sc.tl.leiden(
        adata, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False
    )
    return adata.obs["leiden"].astype(int).to_numpy()


@dataclass(frozen=True)
class LeidenResult:
    """Leiden clusters of a latent scored against labels."""

    nmi: float
    ari: float
    n_clusters: int
    resolution: float
    clusters: np.ndarray = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, float | int]:
        return {"nmi": self.nmi, "ari": self.ari, "n_clusters": self.n_clusters, "resolution": self.resolution}


def leiden_baseline(
    latent, labels, resolution: float = 1.0, seed: int = 0, n_neighbors: int = 15
) -> LeidenResult:
    """NMI (arithmetic) and ARI between ``labels`` and :func:`leiden_clusters` of ``latent``."""
    y = np.asarray(labels)
    x = _as_latent(latent)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have one entry per cell ({x.shape[0]}), got shape {y.shape}")
    clusters = leiden_clusters(x, resolution=resolution, seed=seed, n_neighbors=n_neighbors)
    return LeidenResult(
        nmi=float(normalized_mutual_info_score(y, clusters)),
        ari=float(adjusted_rand_score(y, clusters)),
        n_clusters=int(np.unique(clusters).size),
        resolution=float(resolution),
        clusters=clusters,
    )


# --------------------------------------------------------------------------------------------- label transfer
@dataclass(frozen=True)
class LabelTransfer:
    """Predicted labels of query cells and the share of the k reference neighbours that voted for each."""

    labels: np.ndarray
    confidence: np.ndarray


def knn_label_transfer(reference_latent, reference_labels, query_latent, k: int = 15) -> LabelTransfer:
    """Label each query cell by the majority label of its ``k`` nearest reference cells (Euclidean, in the latent).

    Ties go to the label sorted first.  ``confidence`` is the winning label's share of the ``k`` votes, in (0, 1].
    """
    from sklearn.neighbors import NearestNeighbors

    ref, query = _as_latent(reference_latent), _as_latent(query_latent)
    y = np.asarray(reference_labels).astype(str)
    if y.shape != (ref.shape[0],):
        raise ValueError(f"reference_labels must have one entry per reference cell ({ref.shape[0]}), got {y.shape}")
    if query.shape[1] != ref.shape[1]:
        raise ValueError(f"query_latent has {query.shape[1]} dimensions, reference_latent {ref.shape[1]}")
    if not 1 <= k <= ref.shape[0]:
        raise ValueError(f"k must be between 1 and the number of reference cells ({ref.shape[0]}), got {k}")
    classes, codes = np.unique(y, return_inverse=True)
    _, idx = NearestNeighbors(n_neighbors=k).fit(ref).kneighbors(query)
    votes = np.zeros((query.shape[0], classes.size))
    np.add.at(votes, (np.repeat(np.arange(query.shape[0]), k), codes[idx].ravel()), 1.0)
    best = votes.argmax(axis=1)
    return LabelTransfer(labels=classes[best], confidence=votes.max(axis=1) / k)


def label_transfer_scores(true_labels, predicted_labels) -> dict[str, float]:
    """Accuracy and macro-averaged F1 of transferred labels (F1 averaged over every label that is true or predicted
    somewhere, so predicting a type the query lacks costs F1; scikit-learn's convention)."""
    from sklearn.metrics import f1_score

    y, p = np.asarray(true_labels).astype(str), np.asarray(predicted_labels).astype(str)
    if y.shape != p.shape:
        raise ValueError(f"true and predicted labels differ in shape: {y.shape} vs {p.shape}")
    return {"accuracy": float((y == p).mean()),
            "macro_f1": float(f1_score(y, p, average="macro", zero_division=0))}


# ---------------------------------------------------------------------------------------------------------- PCA
def pca_embedding(adata, n_comps: int = 50, layer: str | None = None, seed: int = 0) -> np.ndarray:
    """PCA of log-normalised counts, ``log(1 + 1e4 * x_ng / sum_g x_ng)``: the unintegrated baseline; (N, n_comps).

    Works on the sparse matrix (scanpy's implicitly centred ARPACK PCA); ``n_comps`` is capped at
    ``min(N, G) - 1``.  ``adata`` is not modified.
    """
    import anndata
    import scanpy as sc

    counts = adata.layers[layer] if layer is not None else adata.X
    tmp = anndata.AnnData(X=counts.astype(np.float32, copy=True))
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    n = max(1, min(n_comps, min(tmp.shape) - 1))
    sc.pp.pca(tmp, n_comps=n, svd_solver="arpack", random_state=seed)
    return np.asarray(tmp.obsm["X_pca"], dtype=np.float32)


# --------------------------------------------------------------------------------------------------------- scIB
def exact_neighbors(x: np.ndarray, k: int, n_jobs: int = 1):
    """Exact Euclidean ``k``-NN (self included, as scib-metrics expects) as ``scib_metrics``' ``NeighborsResults``."""
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(x, dtype=np.float32)
    k = min(k, x.shape[0])
    distances, indices = NearestNeighbors(n_neighbors=k, n_jobs=n_jobs).fit(x).kneighbors(x)
    return NeighborsResults(indices=indices.astype(np.int64), distances=distances.astype(np.float32))


@dataclass(frozen=True)
class ScibConfig:
    """Options of :func:`scib_table`.

    ``batch_metrics``: ``None`` = on iff the data have more than one batch (single-batch data get bio conservation
    only, as in the paper's cortex runs).  ``leiden_nmi_ari``: add scib-metrics' Leiden NMI/ARI to the bio metrics
    (off by default, as in scib-metrics).  ``pre_integrated_key``: obsm key of the unintegrated embedding for PCR
    comparison; ``None`` = :func:`pca_embedding` of ``X`` (which must then hold counts).  Note: scib-metrics 0.5.10
    scores batch mixing with BRAS where 0.5.1 (the paper) used silhouette batch.
    """

    batch_metrics: bool | None = None
    leiden_nmi_ari: bool = False
    pre_integrated_key: str | None = None
    n_jobs: int = 2
    progress_bar: bool = False
    #: ``"exact"`` (sklearn), ``"pynndescent"`` (scib-metrics' default, approximate) or ``"auto"`` (exact up to
    #: ``exact_max_cells`` cells): exact search skips pynndescent's numba compilation, minutes on a small CPU
    neighbors: str = "auto"
    exact_max_cells: int = 50_000
    #: scib-metrics metric names to skip, e.g. ``("kbet_per_label",)`` (the slowest on a CPU)
    exclude: tuple[str, ...] = ()


def scib_table(
    adata,
    batch_key: str,
    label_key: str,
    embedding_obsm_keys: Sequence[str],
    n_jobs: int = 2,
    config: ScibConfig | None = None,
    log_file: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """scIB metrics (scib-metrics ``Benchmarker``, unscaled) of each embedding in ``adata.obsm``.

    Returns a float DataFrame indexed by embedding key with one column per metric plus ``"Batch correction"``,
    ``"Bio conservation"`` and ``"Total" = 0.4 * batch + 0.6 * bio``.  Without batch metrics (single batch) the
    batch and Total columns are NaN.  ``adata`` is not modified (the benchmark runs on a slim copy holding only the
    embeddings and the two obs columns).  ``n_jobs`` is used when no ``config`` is given (else ``config.n_jobs``);
    neighbours: see :attr:`ScibConfig.neighbors`.  With ``log_file`` scib-metrics' log lines (one INFO line per label
    that kBET skips, ...) are appended to that file instead of printed.
    """
    import anndata
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    from .quiet import log_to_file

    config = config or ScibConfig(n_jobs=n_jobs)
    if config.neighbors not in ("auto", "exact", "pynndescent"):
        raise ValueError(f"ScibConfig.neighbors must be 'auto', 'exact' or 'pynndescent', got {config.neighbors!r}")
    keys = list(embedding_obsm_keys)
    for key, where in ((batch_key, "obs"), (label_key, "obs")):
        if key not in adata.obs:
            raise KeyError(f"{key!r} not in adata.{where}; available columns: {list(adata.obs.columns)}")
    missing = [k for k in keys if k not in adata.obsm]
    if not keys or missing:
        raise KeyError(f"embeddings {missing or keys} not in adata.obsm; available: {list(adata.obsm)}")
    n_batches = adata.obs[batch_key].nunique()
    use_batch = config.batch_metrics if config.batch_metrics is not None else n_batches > 1
    if use_batch and n_batches < 2:
        raise ValueError(f"batch metrics need >= 2 batches in obs[{batch_key!r}], found {n_batches}")

    obsm = {k: _as_latent(adata.obsm[k]) for k in keys}
    if config.pre_integrated_key is not None:
        obsm["X_pre"] = np.asarray(adata.obsm[config.pre_integrated_key], dtype=np.float32)
    elif use_batch:
        obsm["X_pre"] = pca_embedding(adata)
    else:  # PCR comparison is a batch metric; the key is required by Benchmarker but never read
        obsm["X_pre"] = obsm[keys[0]]
    obs = pd.DataFrame(
        {batch_key: adata.obs[batch_key].astype(str).to_numpy(), label_key: adata.obs[label_key].astype(str).to_numpy()},
        index=adata.obs_names.astype(str),
    )
    slim = anndata.AnnData(obs=obs, obsm=obsm)
    known = set(BioConservation.__dataclass_fields__) | set(BatchCorrection.__dataclass_fields__)
    unknown = sorted(set(config.exclude) - known)
    if unknown:
        raise ValueError(f"ScibConfig.exclude: unknown metric(s) {unknown}; choose from {sorted(known)}")
    off = {name: False for name in config.exclude}
    bio = {"nmi_ari_cluster_labels_leiden": config.leiden_nmi_ari, **off}
    bench = Benchmarker(
        slim,
        batch_key=batch_key,
        label_key=label_key,
        embedding_obsm_keys=keys,
        bio_conservation_metrics=BioConservation(**{k: v for k, v in bio.items() if k in BioConservation.__dataclass_fields__}),
        batch_correction_metrics=BatchCorrection(**{k: v for k, v in off.items() if k in BatchCorrection.__dataclass_fields__})
        if use_batch
        else None,
        pre_integrated_embedding_obsm_key="X_pre",
        n_jobs=config.n_jobs,
        progress_bar=config.progress_bar,
    )
    exact = config.neighbors == "exact" or (config.neighbors == "auto" and slim.n_obs <= config.exact_max_cells)
    logs = log_to_file("scib_metrics", log_file) if log_file is not None else contextlib.nullcontext()
    with logs:
        bench.prepare(neighbor_computer=partial(exact_neighbors, n_jobs=config.n_jobs) if exact else None)
        bench.benchmark()
    raw = bench.get_results(min_max_scale=False)
    table = raw.drop(index="Metric Type").astype(float)
    table.index.name = "embedding"
    for col in AGGREGATES:
        if col not in table:
            table[col] = np.nan
    return table.loc[keys]


# ------------------------------------------------------------------------------------------------------- tuning
@dataclass(frozen=True)
class TuningGrid:
    """The paper's Figure-5 grid: batch size x prior learning-rate ratio (PLR), each run for every seed.

    PLRs are tried in ascending order per batch size; with ``stop_below_n_labels`` the PLR loop stops once a
    configuration's mean utilized clusters falls below the number of cell types (the reference protocol: larger
    PLRs only prune more).
    """

    batch_sizes: tuple[int, ...] = (128, 256, 512)
    prior_lr_ratios: tuple[float, ...] = (1.0, 2.5, 5.0, 10.0)
    seeds: tuple[int, ...] = (0,)
    stop_below_n_labels: bool = True


#: a tuning trial: (batch_size, prior_lr_ratio, seed) -> {"utilized_clusters": ..., other scores}
Trial = Callable[[int, float, int], Mapping[str, float]]


def tuning_sweep(trial: Trial, n_labels: int, grid: TuningGrid | None = None, progress: bool = True) -> pd.DataFrame:
    """Run ``trial`` over ``grid``; one row per run with its scores, plus per-configuration ``eligible``.

    ``eligible`` = the configuration's mean utilized clusters (over seeds) >= ``n_labels``, the paper's admission
    rule; :func:`select_tuning_config` then picks the best eligible configuration.
    """
    from tqdm.auto import tqdm

    grid = grid or TuningGrid()
    if n_labels < 1:
        raise ValueError(f"n_labels must be >= 1, got {n_labels}")
    rows: list[dict[str, Any]] = []
    total = len(grid.batch_sizes) * len(grid.prior_lr_ratios) * len(grid.seeds)
    bar = tqdm(total=total, desc="tuning sweep", disable=not progress)
    for batch_size in grid.batch_sizes:
        for plr in sorted(grid.prior_lr_ratios):
            runs = []
            for seed in grid.seeds:
                scores = dict(trial(int(batch_size), float(plr), int(seed)))
                if "utilized_clusters" not in scores:
                    raise KeyError("a tuning trial must return 'utilized_clusters' among its scores")
                runs.append({"batch_size": int(batch_size), "prior_lr_ratio": float(plr), "seed": int(seed), **scores})
                bar.update(1)
            rows.extend(runs)
            if grid.stop_below_n_labels and np.mean([r["utilized_clusters"] for r in runs]) < n_labels:
                bar.update(len(grid.seeds) * (sum(p > plr for p in grid.prior_lr_ratios)))
                break
    bar.close()
    return mark_eligible(pd.DataFrame(rows), n_labels)


def mark_eligible(sweep: pd.DataFrame, n_labels: int) -> pd.DataFrame:
    """Set ``eligible`` on every run of a sweep: its configuration's mean utilized clusters over seeds is at least
    ``n_labels`` (recomputed from all rows, so sweeps run in parts can be combined and judged again)."""
    df = sweep.copy()
    mean_used = df.groupby(["batch_size", "prior_lr_ratio"])["utilized_clusters"].transform("mean")
    df["eligible"] = mean_used >= n_labels
    df.attrs["n_labels"] = int(n_labels)
    return df


def select_tuning_config(sweep: pd.DataFrame, score: str = "Total") -> dict[str, float]:
    """The eligible (batch size, PLR) with the highest mean ``score`` over seeds (the paper uses scIB Total, or
    Bio conservation for single-batch data).  Raises ``ValueError`` when no configuration is eligible."""
    if score not in sweep:
        raise KeyError(f"score {score!r} not in the sweep's columns {list(sweep.columns)}")
    ok = sweep[sweep["eligible"]]
    if ok.empty:
        raise ValueError(
            "no configuration reached as many utilized clusters as cell types; widen the grid towards smaller "
            "batch sizes / prior learning-rate ratios, or raise n_clusters"
        )
    means = ok.groupby(["batch_size", "prior_lr_ratio"])[score].mean()
    batch_size, plr = means.idxmax()
    return {"batch_size": int(batch_size), "prior_lr_ratio": float(plr), score: float(means.max())}


def plot_tuning_sweep(sweep: pd.DataFrame, score: str = "Total", path=None):
    """Figure-5 style plot of a :func:`tuning_sweep` result (see :func:`pyro_vmm.plotting.plot_tuning_sweep`)."""
    from .plotting import plot_tuning_sweep as _plot

    return _plot(sweep, score=score, path=path)


def vmm_scvi_trial(
    adata,
    batch_key: str | None,
    labels_key: str,
    model_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    scib: bool = True,
) -> Trial:
    """A :data:`Trial` that trains ``pyro_vmm.VMMSCVI`` on ``adata`` (counts in X, already HVG-subset).

    Returns utilized clusters, the clustering scores vs ``obs[labels_key]`` and, with ``scib``, the scIB aggregates
    of the latent (``Total``, or ``Bio conservation`` for single-batch data).
    """
    from pyro_vmm import VMMSCVI

    def run(batch_size: int, prior_lr_ratio: float, seed: int) -> dict[str, float]:
        data = adata.copy()
        VMMSCVI.setup_anndata(data, batch_key=batch_key)
        model = VMMSCVI(data, seed=seed, **dict(model_kwargs or {}))
        model.train(batch_size=batch_size, prior_lr_ratio=prior_lr_ratio, seed=seed, **dict(train_kwargs or {}))
        probs = model.get_cluster_probabilities()
        out: dict[str, float] = {
            k: (math.nan if v is None else float(v))
            for k, v in clustering_scores(probs, data.obs[labels_key].to_numpy()).to_dict().items()
        }
        if scib:
            data.obsm["X_vmm"] = model.get_latent_representation()
            key = batch_key or "_single_batch"
            if batch_key is None:
                data.obs[key] = "0"
            table = scib_table(data, key, labels_key, ["X_vmm"])
            out.update({k: float(table.loc["X_vmm", k]) for k in AGGREGATES})
        return out

    return run

