"""Figures: MDE embeddings coloured by batch, cell type and prior cluster (paper Figure 3), what each cluster holds
(cell types and batches), the marker genes of each cluster, the tuning sweep and the training curves.

Model-independent: every function takes arrays, an AnnData or a DataFrame.  Figures are drawn with matplotlib's
object API on an Agg canvas (no pyplot, no global backend switch) and, when ``path`` is given, saved atomically.

The MDE embeddings are :func:`pyro_vmm.mde.mde_embedding`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from pyro_vmm.mde import mde_embedding

__all__ = [
    "COLUMN_TITLES",
    "cluster_composition",
    "marker_dotplot",
    "mde_figure",
    "mde_grid",
    "plot_tuning_sweep",
    "training_curves",
]

#: column titles of the paper's Figure 3, by the obs key coloured in that column
COLUMN_TITLES = {"batch": "Batch correction", "cell_type": "Bio conservation", "vmm_cluster": "Prior cluster membership"}


def _palette(n: int) -> list:
    """tab20 reordered (dark shades first, then light), cycled: distinct colours for the first 20 groups."""
    from matplotlib import colormaps

    tab20 = colormaps["tab20"].colors
    order = list(tab20[0::2]) + list(tab20[1::2])
    return [order[i % len(order)] for i in range(n)]


def _scatter(ax, xy: np.ndarray, values: pd.Series, title: str, renumber: bool) -> None:
    """One panel: points coloured by category; clusters renumbered 1..n by size; circles <= 20 groups, then ^."""
    cats = values.astype(str)
    order = _by_size(cats).index.tolist() if renumber else sorted(cats.unique(), key=_natural_key)
    colors = _palette(len(order))
    for i, cat in enumerate(order):
        mask = (cats == cat).to_numpy()
        ax.scatter(
            xy[mask, 0], xy[mask, 1], s=3, alpha=0.5, color=colors[i], marker="o" if i < 20 else "^",
            label=str(i + 1) if renumber else cat, rasterized=True, linewidths=0,
        )
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(order) <= 30:
        ax.legend(markerscale=4, fontsize=6, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5),
                  ncol=1 + len(order) // 16)


def _by_size(cats: pd.Series) -> pd.Series:
    """Cluster sizes, largest first: the order in which every figure numbers clusters 1..n."""
    return cats.value_counts()


def _natural_key(s: str):
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


def _finish(fig, path):
    """Tight layout, then (when ``path`` is given) save ``fig`` there; returns ``fig``."""
    fig.tight_layout()
    if path is not None:
        _save(fig, path)
    return fig


def _save(fig, path) -> None:
    from pyro_vmm.utils import atomic_path

    fmt = os.path.splitext(str(path))[1].lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")


def mde_grid(
    adata,
    rows: Mapping[str, tuple[str, Sequence[str]]],
    path: str | os.PathLike | None = None,
    seed: int = 0,
    titles: Mapping[str, str] | None = None,
):
    """A grid of MDE scatter plots: one row per embedding, one column per obs key it is coloured by.

    ``rows``: row label -> (obsm key of the embedding, obs keys to colour by).  Columns are titled by
    :data:`COLUMN_TITLES` (overridable by ``titles``), e.g. the paper's "Batch correction" / "Bio conservation" /
    "Prior cluster membership"; keys ending in ``cluster`` are renumbered 1..n by cluster size.  The MDE of each
    embedding is cached in ``adata.obsm[f"{key}_mde"]``.  Returns the matplotlib ``Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    titles = {**COLUMN_TITLES, **(titles or {})}
    if not rows:
        raise ValueError("rows is empty: give at least one (embedding key, colour keys) pair")
    for label, (emb, keys) in rows.items():
        if emb not in adata.obsm:
            raise KeyError(f"embedding {emb!r} (row {label!r}) not in adata.obsm; available: {list(adata.obsm)}")
        for key in keys:
            if key not in adata.obs:
                raise KeyError(f"colour key {key!r} not in adata.obs; available: {list(adata.obs.columns)}")
    n_rows, n_cols = len(rows), max(len(keys) for _, keys in rows.values())
    fig = Figure(figsize=(4.2 * n_cols, 3.6 * n_rows))
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    for r, (label, (emb, keys)) in enumerate(rows.items()):
        cache = f"{emb}_mde"
        if cache not in adata.obsm or adata.obsm[cache].shape != (adata.n_obs, 2):
            adata.obsm[cache] = mde_embedding(adata.obsm[emb], seed=seed)
        xy = np.asarray(adata.obsm[cache])
        for c in range(n_cols):
            ax = axes[r, c]
            if c >= len(keys):
                ax.set_axis_off()
                continue
            key = keys[c]
            title = titles.get(key, key) if r == 0 else ""
            _scatter(ax, xy, adata.obs[key], title, renumber=key.endswith("cluster"))
            if c == 0 and n_rows > 1:
                ax.set_ylabel(label)
    return _finish(fig, path)


def mde_figure(
    adata,
    embedding_key: str,
    color_keys: Sequence[str] = ("batch", "cell_type", "vmm_cluster"),
    path: str | os.PathLike | None = None,
    seed: int = 0,
    titles: Mapping[str, str] | None = None,
):
    """One row of :func:`mde_grid`: the MDE of ``adata.obsm[embedding_key]`` coloured by each of ``color_keys``."""
    return mde_grid(adata, {embedding_key: (embedding_key, tuple(color_keys))}, path=path, seed=seed, titles=titles)


def cluster_composition(
    clusters,
    labels=None,
    batches=None,
    path: str | os.PathLike | None = None,
    annotate_max: int = 40,
):
    r"""What each cluster holds: a heatmap of :math:`P(\text{label} \mid \text{cluster})` and the batch mix per cluster.

    Clusters are renumbered 1..n by size, largest first -- the numbering of the cluster panel of :func:`mde_grid`,
    so the two figures can be read side by side; tick labels give each cluster's number of cells.  Top panel (with
    ``labels``): one row per label, one column per cluster, colour = share of the cluster's cells with that label
    (columns sum to 1), annotated with the counts when there are at most ``annotate_max`` clusters.  Bottom panel
    (with ``batches``): the share of each batch in each cluster as stacked bars, with the batch mix of all cells as
    the dashed lines -- a cluster drawn from one batch stands out.  Returns the matplotlib ``Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cl = pd.Series(np.asarray(clusters)).astype(str)
    if cl.empty:
        raise ValueError("clusters is empty: nothing to draw")
    if labels is None and batches is None:
        raise ValueError("give labels and/or batches: the figure shows what the clusters hold")
    parts = {name: pd.Series(np.asarray(v)).astype(str) for name, v in (("labels", labels), ("batches", batches))
             if v is not None}
    for name, v in parts.items():
        if len(v) != len(cl):
            raise ValueError(f"{name} has {len(v)} entries but clusters has {len(cl)}; pass one per cell")
    sizes = _by_size(cl)  # numbered as the MDE panel numbers them
    order = sizes.index.tolist()
    ticks = [f"{i + 1}\n({n})" for i, n in enumerate(sizes.to_numpy())]
    x = np.arange(len(order))
    heights = ([max(2.0, 0.28 * parts["labels"].nunique())] if "labels" in parts else []) + (
        [1.6] if "batches" in parts else [])
    fig = Figure(figsize=(min(max(5.0, 0.42 * len(order) + 2.5), 24.0), sum(heights) + 1.2))  # K = 100: 24 in
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(len(heights), 1, sharex=True, gridspec_kw={"height_ratios": heights}))
    ax_iter = iter(axes)
    if "labels" in parts:
        ax = next(ax_iter)
        counts = pd.crosstab(parts["labels"], cl).reindex(columns=order, fill_value=0)
        counts = counts.loc[sorted(counts.index, key=_natural_key)]
        share = counts / counts.sum(axis=0)
        im = ax.imshow(share.to_numpy(), aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_yticks(np.arange(len(share.index)))
        ax.set_yticklabels(share.index, fontsize=7)
        if len(order) <= annotate_max:
            for (r, c), n in np.ndenumerate(counts.to_numpy()):
                if n:
                    ax.text(c, r, str(n), ha="center", va="center", fontsize=5,
                            color="white" if share.iat[r, c] > 0.6 else "black")
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label="share of the cluster")
        ax.set_title("Cell types in each cluster", fontsize=10)
    if "batches" in parts:
        ax = next(ax_iter)
        mix = pd.crosstab(parts["batches"], cl, normalize="columns").reindex(columns=order, fill_value=0.0)
        mix = mix.loc[sorted(mix.index, key=_natural_key)]
        overall = parts["batches"].value_counts(normalize=True).reindex(mix.index).to_numpy()
        colors = _palette(len(mix.index))
        bottom = np.zeros(len(order))
        for i, batch in enumerate(mix.index):
            ax.bar(x, mix.loc[batch].to_numpy(), bottom=bottom, color=colors[i], width=0.85, label=str(batch))
            bottom += mix.loc[batch].to_numpy()
        for level in np.cumsum(overall)[:-1]:
            ax.axhline(level, color="k", ls="--", lw=0.7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("batch share", fontsize=8)
        ax.legend(fontsize=6, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
        if "labels" not in parts:
            ax.set_title("Batches in each cluster", fontsize=10)
    last = axes[-1]
    last.set_xticks(x)
    last.set_xticklabels(ticks, fontsize=6)
    last.set_xlabel("cluster (cells), largest first", fontsize=8)
    return _finish(fig, path)


def marker_dotplot(
    adata,
    markers: pd.DataFrame,
    cluster_key: str = "vmm_cluster",
    layer: str | None = None,
    n_per_cluster: int = 3,
    path: str | os.PathLike | None = None,
):
    r"""Dot plot of the marker genes of every cluster: rows = clusters, columns = each cluster's top markers.

    ``markers`` is the table of :meth:`pyro_vmm.VMMSCVI.cluster_markers` (columns ``cluster``, ``rank``,
    ``gene``); up to ``n_per_cluster`` genes per cluster are drawn, in the clusters' order, each gene once.  Clusters
    are numbered 1..n by size, largest first, as in the MDE and composition figures.  Dot area = share of the
    cluster's cells in which the gene is detected (count > 0); colour = the cluster's mean of
    :math:`\log(1 + 10^4 x_{ng} / \sum_g x_{ng})` from the raw counts (``adata.X`` or ``layer``), scaled per gene to
    [0, 1] across clusters.  Returns the matplotlib ``Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from scipy import sparse as sp

    if cluster_key not in adata.obs:
        raise KeyError(f"cluster_key {cluster_key!r} not in adata.obs; available: {list(adata.obs.columns)}")
    missing_cols = {"cluster", "rank", "gene"} - set(markers.columns)
    if missing_cols:
        raise ValueError(f"markers lacks the columns {sorted(missing_cols)}; pass the table of model.cluster_markers()")
    if n_per_cluster < 1:
        raise ValueError(f"n_per_cluster must be >= 1, got {n_per_cluster}")
    clusters = adata.obs[cluster_key].astype(str).reset_index(drop=True)
    by_size = _by_size(clusters)
    order = by_size.index.tolist()
    genes: list[str] = []
    owner: list[int] = []  # the row (cluster position) each gene was chosen for
    ranked = markers.assign(cluster=markers["cluster"].astype(str)).sort_values(["cluster", "rank"])
    for row, cl in enumerate(order):
        picks = [g for g in ranked.loc[ranked["cluster"] == cl, "gene"].astype(str) if g not in genes]
        genes += picks[:n_per_cluster]
        owner += [row] * len(picks[:n_per_cluster])
    if not genes:
        raise ValueError("markers has no genes for the clusters of adata.obs[cluster_key]; nothing to draw")
    unknown = [g for g in genes if g not in adata.var_names]
    if unknown:
        raise ValueError(f"marker genes not in adata.var_names (first: {unknown[:3]}); pass the AnnData the model used")

    counts = adata.layers[layer] if layer is not None else adata.X
    counts = sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    cols = adata.var_names.get_indexer(genes)
    sub = counts[:, cols]
    sub = np.asarray(sub.todense()) if sp.issparse(sub) else np.asarray(sub)
    logn = np.log1p(1e4 * sub / np.maximum(totals, 1.0)[:, None])
    codes = clusters.to_numpy()
    frac = np.stack([(sub[codes == cl] > 0).mean(axis=0) for cl in order])
    mean = np.stack([logn[codes == cl].mean(axis=0) for cl in order])
    span = mean.max(axis=0) - mean.min(axis=0)
    scaled = (mean - mean.min(axis=0)) / np.where(span > 0, span, 1.0)

    n_rows, n_genes = len(order), len(genes)
    fig = Figure(figsize=(min(max(5.0, 0.24 * n_genes + 3.0), 24.0), max(2.8, 0.26 * n_rows + 1.8)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    yy, xx = np.meshgrid(np.arange(n_rows), np.arange(n_genes), indexing="ij")
    area = 110.0
    points = ax.scatter(xx.ravel(), yy.ravel(), s=area * frac.ravel(), c=scaled.ravel(), cmap="Reds", vmin=0, vmax=1,
                        edgecolors="0.4", linewidths=0.3)
    for i, row in enumerate(owner):  # outline each gene's own cluster
        ax.scatter([i], [row], s=area * 1.25, facecolors="none", edgecolors="k", linewidths=0.8)
    ax.set_xticks(np.arange(n_genes))
    ax.set_xticklabels(genes, rotation=90, fontsize=6)
    ax.set_yticks(np.arange(n_rows))
    ax.set_yticklabels([f"{i + 1} ({n})" for i, n in enumerate(by_size.to_numpy())], fontsize=6)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.set_xlim(-0.7, n_genes - 0.3)
    ax.set_ylabel("cluster (cells), largest first", fontsize=8)
    ax.set_title(f"Marker genes: top {n_per_cluster} per cluster (one-vs-rest DE; ringed = the gene's own cluster)",
                 fontsize=9)
    ax.grid(True, color="0.92", lw=0.5)
    ax.set_axisbelow(True)
    fig.colorbar(points, ax=ax, fraction=0.03, pad=0.01, label="mean log-normalised expression (scaled per gene)")
    for share in (0.25, 0.5, 1.0):
        ax.scatter([], [], s=area * share, color="0.5", label=f"{share:.0%}")
    ax.legend(title="detected in", fontsize=6, title_fontsize=6, frameon=False, loc="upper left",
              bbox_to_anchor=(1.08, 1.0), labelspacing=1.2)
    return _finish(fig, path)


def plot_tuning_sweep(sweep: pd.DataFrame, score: str = "Total", path: str | os.PathLike | None = None):
    """Paper Figure 5: utilized clusters and ``score`` (mean +- sd over seeds) vs batch size, one line per PLR.

    ``sweep`` is :func:`pyro_vmm.evaluation.tuning_sweep`'s DataFrame; the dashed line marks the number of cell
    types (``sweep.attrs["n_labels"]``), filled markers the eligible configurations.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    need = {"batch_size", "prior_lr_ratio", "utilized_clusters", "eligible"}
    if not need <= set(sweep.columns):
        raise KeyError(f"sweep lacks columns {sorted(need - set(sweep.columns))}; pass tuning_sweep()'s result")
    panels = [("utilized_clusters", "Utilized clusters")] + ([(score, score)] if score in sweep else [])
    fig = Figure(figsize=(4.5 * len(panels), 3.6))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    stats = sweep.groupby(["prior_lr_ratio", "batch_size"]).agg(
        {**{col: ["mean", "std"] for col, _ in panels}, "eligible": "first"}
    )
    colors = _palette(sweep["prior_lr_ratio"].nunique())
    for ax, (col, name) in zip(axes, panels, strict=True):
        for i, plr in enumerate(sorted(sweep["prior_lr_ratio"].unique())):
            s = stats.loc[plr]
            x = s.index.to_numpy()
            mean, sd = s[(col, "mean")].to_numpy(float), np.nan_to_num(s[(col, "std")].to_numpy(float))
            ax.errorbar(x, mean, yerr=sd, color=colors[i], label=f"PLR {plr:g}", capsize=2, lw=1)
            ok = s[("eligible", "first")].to_numpy(bool)
            ax.scatter(x[ok], mean[ok], color=colors[i], zorder=3, s=18)
            ax.scatter(x[~ok], mean[~ok], facecolors="none", edgecolors=colors[i], zorder=3, s=18)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sweep["batch_size"].unique()))
        ax.set_xticklabels([str(b) for b in sorted(sweep["batch_size"].unique())])
        ax.set_xlabel("batch size")
        ax.set_ylabel(name)
        if col == "utilized_clusters" and "n_labels" in sweep.attrs:
            ax.axhline(sweep.attrs["n_labels"], color="k", ls="--", lw=0.8, label="cell types")
    axes[0].legend(fontsize=7, frameon=False)
    return _finish(fig, path)


#: the panels of :func:`training_curves`: (y label, history keys drawn in it)
TRAINING_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("−ELBO per datum (VI loss)", ("elbo_train", "elbo_validation")),
    ("EM loss (MAP objective)", ("em_loss_train",)),
    ("utilized clusters", ("utilized_clusters_train", "utilized_clusters_validation")),
    ("NMI-unmerged (early-stopping criterion)", ("nmi_validation",)),
)


def _history_series(values) -> np.ndarray:
    """One history entry as a float array: scvi-tools keeps a one-column DataFrame per key, others a list."""
    if isinstance(values, pd.DataFrame):
        values = values.iloc[:, 0]
    return np.asarray(pd.to_numeric(pd.Series(values, dtype=object), errors="coerce"), dtype=float)


def training_curves(history: Mapping[str, object], path: str | os.PathLike | None = None):
    """The training run per epoch: the VI loss −ELBO (train, validation), the EM step's loss and the number of
    utilized clusters (argmax of q(c | z) over the epoch's cells), one panel each; panels without data are left out.

    ``history`` is ``VMMSCVI.history`` (scvi-tools' dict of one-column DataFrames indexed by epoch) or any mapping
    of the same keys (``elbo_train``, ``elbo_validation``, ``em_loss_train``, ``utilized_clusters_train``,
    ``utilized_clusters_validation``) to per-epoch sequences; ``None`` entries (an epoch without that value) are
    skipped.  Returns the matplotlib ``Figure``; saved atomically to ``path`` when given.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {k: _history_series(history[k]) for _, keys in TRAINING_PANELS for k in keys if k in history}
    series = {k: v for k, v in series.items() if np.isfinite(v).any()}
    panels = [(label, [k for k in keys if k in series]) for label, keys in TRAINING_PANELS]
    panels = [(label, keys) for label, keys in panels if keys]
    if not panels:
        known = sorted(k for _, keys in TRAINING_PANELS for k in keys)
        raise ValueError(f"history has none of {known} with a finite value; pass model.history after training")
    fig = Figure(figsize=(4.2 * len(panels), 3.2))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (label, keys) in zip(axes, panels, strict=True):
        for key in keys:
            y = series[key]
            x = np.arange(1, y.size + 1)
            ok = np.isfinite(y)
            ax.plot(x[ok], y[ok], lw=1.2, label=key.rsplit("_", 1)[-1],
                    drawstyle="steps-mid" if key.startswith("utilized") else "default")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, frameon=False)  # train / validation cells, also when only one is drawn
    return _finish(fig, path)
