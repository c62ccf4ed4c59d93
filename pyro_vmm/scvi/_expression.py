r"""Decoded expression, differential expression and cluster markers for :class:`pyro_vmm.VMMSCVI`.

The methods users of ``scvi.model.SCVI`` know, with the same arguments and outputs:

>>> model.get_normalized_expression(transform_batch=["ctrl", "stim"])   # rho_n, averaged over both conditions
>>> model.differential_expression(groupby="cell_type", group1="CD14 Mono", mode="change")
>>> model.cluster_markers()             # one-vs-rest DE of every VMM cluster: marker genes, strongest first

The expression of cell :math:`n` is the decoder's frequency vector :math:`\rho_n = \operatorname{softmax}
f_\theta(z_n, s)` with :math:`z_n \sim q_\phi(z \mid x_n, s_n)`; scaled by a library size it is the NB/ZINB mean
:math:`\mu_n = \ell_n \rho_n`.  Decoding with another batch :math:`s` than the cell's own gives its expression "as
if measured in batch s", which is how batch effects are removed from expression (``transform_batch``).

Differential expression is scvi-tools' own (:func:`scvi.model.base._de_core._de_core`, Lopez et al. 2018 ``vanilla``
and Boyeau et al. 2019 ``change`` mode) with this model's :math:`\rho` as the posterior samples of expression.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from numbers import Number
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scipy import sparse as sp

from ..utils import set_seed

__all__ = ["ExpressionMixin"]

#: the per-cell scaling scvi-tools' ``scrna_raw_counts_properties`` caches in ``adata.obs``
RAW_NORM_KEY = "_scvi_raw_norm_scaling"

#: columns of a ``change``-mode DE table that :meth:`ExpressionMixin.cluster_markers` keeps, in this order
MARKER_COLUMNS = (
    "lfc_mean",
    "lfc_std",
    "proba_de",
    "bayes_factor",
    "non_zeros_proportion1",
    "non_zeros_proportion2",
    "raw_normalized_mean1",
    "raw_normalized_mean2",
)


def backed_raw_counts_properties(
    adata_manager, idx1: np.ndarray, idx2: np.ndarray, var_idx: np.ndarray | None = None, chunk: int = 4096
) -> dict[str, np.ndarray]:
    """scvi-tools' ``scrna_raw_counts_properties`` (per-gene mean, share of non-zero counts and mean of the counts
    scaled to 10,000 per cell, for both groups) for a backed AnnData: the groups' rows are read from the file in
    chunks of ``chunk`` cells, the matrix is never loaded whole (scvi-tools' version fails on a backed matrix)."""
    from scvi import REGISTRY_KEYS

    from ._backed import BackedMatrix

    matrix = BackedMatrix(adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY))
    out: dict[str, np.ndarray] = {}
    try:
        for group, idx in (("1", idx1), ("2", idx2)):
            rows = np.asarray(idx)
            rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
            n_genes = matrix.shape[1] if var_idx is None else len(np.arange(matrix.shape[1])[var_idx])
            sums, nonzero, normalized = np.zeros(n_genes), np.zeros(n_genes), np.zeros(n_genes)
            for start in range(0, len(rows), chunk):
                block = matrix.read_rows(rows[start : start + chunk])
                block = sp.csr_matrix(block, dtype=np.float64)
                scale = 1e4 / np.asarray(block.sum(axis=1)).ravel()  # over all genes, as scvi-tools
                if var_idx is not None:
                    block = block[:, var_idx]
                sums += np.asarray(block.sum(axis=0)).ravel()
                nonzero += np.asarray((block != 0).sum(axis=0)).ravel()
                normalized += np.asarray(block.multiply(scale[:, None]).sum(axis=0)).ravel()
            n = max(len(rows), 1)
            out[f"raw_mean{group}"] = sums / n
            out[f"non_zeros_proportion{group}"] = nonzero / n
            out[f"raw_normalized_mean{group}"] = normalized / n
    finally:
        matrix.close()
    return {key: out[key] for key in ("raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2",
                                      "raw_normalized_mean1", "raw_normalized_mean2")}


class ExpressionMixin:
    """``get_normalized_expression``, ``differential_expression`` and ``cluster_markers`` for ``VMMSCVI``.

    Needs from the host class: ``module.normalized_expression(x, batch_index, n_samples, batch_codes, **covs)``,
    ``_minibatch_args(adata, indices, batch_size)`` (yielding ``(x, batch_index, covs)``), ``_validate_anndata``, ``get_anndata_manager``,
    ``get_latent_representation`` and ``get_cluster_assignments``.
    """

    def _batch_codes(self, adata, transform_batch) -> list[int | None]:
        """Batch categories (or ``None``) -> integer codes, with the valid categories named on a mistake."""
        from scvi import REGISTRY_KEYS

        manager = self.get_anndata_manager(adata, required=True)
        mapping = manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping
        wanted = [transform_batch] if isinstance(transform_batch, (str, Number)) or transform_batch is None else list(
            transform_batch
        )
        if not wanted:
            raise ValueError("transform_batch is an empty list; pass None (each cell's own batch) or batch names")
        codes: list[int | None] = []
        for cat in wanted:
            if cat is None:
                codes.append(None)
                continue
            hits = np.flatnonzero(np.asarray(mapping).astype(str) == str(cat))
            if hits.size == 0:
                raise ValueError(
                    f"transform_batch {cat!r} is not a batch of this model; its batches are "
                    f"{[str(c) for c in mapping]}. Fix: pass one of them, a list of them, or None."
                )
            codes.append(int(hits[0]))
        return codes

    def get_normalized_expression(
        self,
        adata=None, indices: Sequence[int] | None = None,
        transform_batch: str | Number | Sequence[str | Number | None] | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        weights: Literal["uniform"] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
    ) -> np.ndarray | pd.DataFrame:
        r"""Decoded expression :math:`\rho_n \cdot` ``library_size``, as ``scvi.model.SCVI.get_normalized_expression``.

        Parameters
        ----------
        adata, indices
            Cells to decode (default: all cells of the model's AnnData).
        transform_batch
            ``None``: each cell's own batch; a batch name: decode every cell as if measured in that batch; a list:
            the average of :math:`\rho` over those batches (batch-corrected expression).
        gene_list
            Return these genes only (every name must be a gene of the model).
        library_size
            A number: :math:`\rho` scaled to this many counts (1: frequencies, rows sum to 1); ``"latent"``: the
            NB/ZINB mean :math:`\ell_n \rho_n` with the cell's observed library size :math:`\ell_n` (this model does
            not infer a library size).
        n_samples
            Draws :math:`z \sim q(z \mid x)` per cell; with ``return_mean`` their average is returned.
        n_samples_overall
            Instead of ``n_samples``: this many rows drawn at random (with replacement) from the decoded samples of
            all the cells, shape ``(n_samples_overall, n_genes)`` -- what differential expression samples from.
        weights
            ``None`` or ``"uniform"`` (scvi-tools' importance weights are not implemented for this model).
        batch_size
            Cells per forward pass (default ``scvi.settings.batch_size``).
        return_mean, return_numpy
            As in scvi-tools: ``(n_cells, n_genes)`` DataFrame (gene columns, cell index) by default;
            ``(n_samples, n_cells, n_genes)`` array when ``n_samples > 1`` and ``return_mean=False``.
        silent
            No progress bar.
        """
        from tqdm.auto import tqdm

        if weights not in (None, "uniform"):
            raise NotImplementedError(
                f"weights={weights!r}: importance-weighted expression is not implemented for VMMSCVI; pass "
                "weights='uniform' (or None)."
            )
        if isinstance(library_size, str):
            if library_size != "latent":
                raise ValueError(f"library_size must be a positive number or 'latent', got {library_size!r}")
        elif not (np.isfinite(library_size) and library_size > 0):
            raise ValueError(f"library_size must be a positive number or 'latent', got {library_size!r}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        if indices is None:
            indices = np.arange(adata.n_obs)
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        if indices.size == 0:
            raise ValueError("indices selects no cells; pass at least one cell")
        if n_samples_overall is not None:
            if n_samples_overall < 1:
                raise ValueError(f"n_samples_overall must be >= 1, got {n_samples_overall}")
            n_samples = n_samples_overall // indices.size + 1
        codes = tuple(self._batch_codes(adata, transform_batch))
        gene_mask = np.ones(adata.n_vars, dtype=bool)
        if gene_list is not None:
            names = pd.Index(adata.var_names.astype(str))
            missing = [g for g in map(str, gene_list) if g not in names]
            if missing:
                raise ValueError(
                    f"{len(missing)} gene(s) of gene_list are not genes of the model (first: {missing[:3]}); check "
                    "the names against adata.var_names."
                )
            gene_mask = names.isin([str(g) for g in gene_list])

        parts = []
        batches = self._minibatch_args(adata, indices, batch_size)
        keep = torch.as_tensor(gene_mask, device=self.module.device)
        with torch.inference_mode():
            for x, b, c in tqdm(batches, disable=silent, desc="decoding", unit="batch", leave=False):
                rho = self.module.normalized_expression(x, b, n_samples=n_samples, batch_codes=codes, **c)  # (S,B,G)
                # "latent": the library the likelihood uses (the size factor when registered)
                scale = self.module._library(x, c.get("size_factor")) if library_size == "latent" else float(
                    library_size)
                parts.append((rho * scale)[..., keep].cpu().numpy())
        expr = np.concatenate(parts, axis=1)  # (S, N, G')

        if n_samples_overall is not None:
            flat = expr.reshape(-1, expr.shape[-1])
            return flat[np.random.choice(flat.shape[0], n_samples_overall, replace=True)]
        if n_samples == 1:
            expr = expr[0]
        elif return_mean:
            expr = expr.mean(axis=0)
        else:
            return expr
        if return_numpy:
            return expr
        return pd.DataFrame(expr, index=adata.obs_names[indices], columns=adata.var_names[gene_mask])

    def differential_expression(
        self,
        adata=None,
        groupby: str | None = None,
        group1: Sequence[str] | str | None = None,
        group2: str | None = None,
        idx1: Sequence[int] | Sequence[bool] | str | None = None,
        idx2: Sequence[int] | Sequence[bool] | str | None = None,
        mode: Literal["vanilla", "change"] = "vanilla",
        delta: float = 0.25,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1: Sequence[str] | None = None,
        batchid2: Sequence[str] | None = None,
        fdr_target: float = 0.05,
        silent: bool = False,
        filter_outlier_cells: bool = False,
        **kwargs,
    ) -> pd.DataFrame:
        r"""Bayesian differential expression, as ``scvi.model.SCVI.differential_expression`` (same arguments).

        Groups are given by an ``adata.obs`` column (``groupby``, ``group1``, ``group2``; one-vs-rest for every
        category when ``group1`` is ``None``) or by cell masks / indices / ``obs`` queries (``idx1``, ``idx2``).
        Expression samples are this model's :math:`\rho` (:meth:`get_normalized_expression`); ``mode="change"``
        gives the posterior log fold change :math:`\log_2 \rho^{(1)} - \log_2 \rho^{(2)}` (``lfc_mean``, ...), the
        probability that :math:`|\mathrm{LFC}| > \delta` (``proba_de``) and an FDR-controlled call
        (``is_de_fdr_<fdr_target>``). ``**kwargs`` go to scvi-tools' ``DifferentialComputation.get_bayes_factors``
        (e.g. ``n_samples``, ``pseudocounts``).
        """
        from scvi import REGISTRY_KEYS
        from scvi.model._utils import scrna_raw_counts_properties
        from scvi.model.base._de_core import _de_core

        from ..validation import InputError

        adata = self._validate_anndata(adata)
        if groupby is not None and groupby not in adata.obs:
            columns = [str(c) for c in adata.obs.columns if not str(c).startswith("_scvi")]
            raise InputError(
                f"groupby={groupby!r} is not a column of adata.obs; available columns: {columns}. Fix: pass one of "
                "them (to compare VMM clusters use model.cluster_markers(), or set adata.obs['vmm_cluster'] = "
                "model.get_cluster_assignments().astype(str))."
            )
        if groupby is None and idx1 is None:
            raise ValueError("give groupby (an adata.obs column) or idx1 (the cells of the first group)")
        from ._backed import is_backed

        manager = self.get_anndata_manager(adata, required=True)
        backed = is_backed(manager.get_from_registry(REGISTRY_KEYS.X_KEY))
        raw_properties = backed_raw_counts_properties if backed else scrna_raw_counts_properties
        model_fn = partial(self.get_normalized_expression, return_numpy=True, n_samples=1, batch_size=batch_size)
        representation_fn = self.get_latent_representation if filter_outlier_cells else None
        # scvi-tools' raw-count statistics cache a per-cell scaling in adata.obs; the user's AnnData is left as it was
        added = RAW_NORM_KEY not in adata.obs
        try:
            return _de_core(
                manager,
                model_fn,
                representation_fn,
                groupby,
                group1,
                group2,
                idx1,
                idx2,
                all_stats,
                raw_properties,
                adata.var_names,
                mode,
                batchid1,
                batchid2,
                delta,
                batch_correction,
                fdr_target,
                silent,
                **kwargs,
            )
        finally:
            if added and RAW_NORM_KEY in adata.obs:
                del adata.obs[RAW_NORM_KEY]

    def cluster_markers(
        self,
        adata=None,
        n_markers: int = 10,
        min_cells: int = 10,
        min_expressing: float = 0.1,
        delta: float = 0.25,
        fdr_target: float = 0.05,
        batch_correction: bool | None = None,
        seed: int | None = None,
        batch_size: int | None = None,
        silent: bool = False,
        **kwargs,
    ) -> pd.DataFrame:
        r"""Marker genes of every VMM cluster: ``change``-mode DE of the cluster against all other cells.

        A marker of cluster :math:`k` is a gene called DE at ``fdr_target`` (:math:`P(|\mathrm{LFC}| > \delta)`
        controlled as in scvi-tools), up in the cluster (``lfc_mean > 0``) and detected in at least
        ``min_expressing`` of its cells; the ``n_markers`` with the largest ``lfc_mean`` are kept, strongest first.
        Clusters are the model's own assignments :math:`\arg\max_k q(c=k \mid z)` (``obs["vmm_cluster"]`` of
        ``pyro-vmm scrna``); ``cluster_number`` numbers them 1..n by size, largest first, as the figures do.
        Clusters with fewer than ``min_cells`` cells are skipped (listed in ``result.attrs["skipped_clusters"]``).

        ``batch_correction`` (default: on for multi-batch data) decodes both groups in every batch and pools
        them, so markers reflect cell state rather than the batch mix of a cluster.  ``seed`` seeds the global
        RNGs (like ``train(seed=...)``) so a CPU run is repeatable.  ``**kwargs`` go to
        :meth:`differential_expression`.

        Returns a long table, one row per (cluster, marker): ``cluster``, ``cluster_number``, ``n_cells``,
        ``rank``, ``gene`` and the DE statistics ``lfc_mean``, ``lfc_std``, ``proba_de``, ``bayes_factor``,
        ``non_zeros_proportion1/2`` and ``raw_normalized_mean1/2`` (1 = the cluster, 2 = the other cells).
        """
        from tqdm.auto import tqdm

        if n_markers < 1 or min_cells < 1 or not 0.0 <= min_expressing <= 1.0:
            raise ValueError(
                f"need n_markers >= 1, min_cells >= 1 and 0 <= min_expressing <= 1, got n_markers={n_markers}, "
                f"min_cells={min_cells}, min_expressing={min_expressing}"
            )
        adata = self._validate_anndata(adata)
        set_seed(seed)
        if batch_correction is None:
            batch_correction = self.summary_stats.n_batch > 1
        assign = pd.Series(self.get_cluster_assignments(adata, batch_size=batch_size))
        sizes = assign.value_counts()  # largest first: the figures' numbering
        number = {k: i + 1 for i, k in enumerate(sizes.index)}
        fdr_col = f"is_de_fdr_{fdr_target}"
        rows = []
        todo = [k for k in sizes.index if sizes[k] >= min_cells and sizes[k] < len(assign)]
        skipped = [int(k) for k in sizes.index if k not in todo]
        for k in tqdm(todo, disable=silent, desc="cluster markers", unit="cluster"):
            in_k = (assign == k).to_numpy()
            de = self.differential_expression(
                adata, idx1=in_k, idx2=~in_k, mode="change", delta=delta, fdr_target=fdr_target,
                batch_correction=batch_correction, batch_size=batch_size, silent=True, **kwargs,
            )
            up = de[de[fdr_col] & (de["lfc_mean"] > 0) & (de["non_zeros_proportion1"] >= min_expressing)]
            top = up.sort_values("lfc_mean", ascending=False).head(n_markers)
            block = top.loc[:, list(MARKER_COLUMNS)].copy()
            block.insert(0, "gene", top.index.astype(str))
            block.insert(0, "rank", np.arange(1, len(top) + 1))
            block.insert(0, "n_cells", int(sizes[k]))
            block.insert(0, "cluster_number", number[k])
            block.insert(0, "cluster", int(k))
            rows.append(block.reset_index(drop=True))
        columns = ["cluster", "cluster_number", "n_cells", "rank", "gene", *MARKER_COLUMNS]
        table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
        table.attrs["skipped_clusters"] = skipped
        return table
