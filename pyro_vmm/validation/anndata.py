"""AnnData-level checks of :mod:`pyro_vmm.validation`: the counts, keys and covariates of ``setup_anndata`` and of a
query AnnData, in one call."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._messages import InputError, InputWarning, _closest, _first, _Names
from .counts import CountsSummary, _as_matrix, _raise_value_problems, _scan, _summary
from .keys import validate_covariates, validate_obs_key


def validate_anndata(
    adata: Any,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None, continuous_covariate_keys: Sequence[str] | None = None,
    integer: bool = True,
    allow_empty_cells: bool = False,
    allow_empty_genes: bool = True,
) -> CountsSummary:
    """Check an AnnData before a model is set up on it (works on backed AnnData: the matrix is read in chunks).

    Checks, in order: it is an AnnData with at least one cell and gene; ``layer`` exists; ``batch_key`` and
    ``labels_key`` are ``adata.obs`` columns without missing values; the covariates pass
    :func:`validate_covariates`; the counts pass :func:`validate_counts`;
    no cell has zero total count (unless ``allow_empty_cells``); genes without any count give an
    :class:`InputWarning` (an :class:`InputError` when ``allow_empty_genes=False``).
    """
    if not (hasattr(adata, "obs") and hasattr(adata, "var") and hasattr(adata, "layers")):
        raise InputError(
            f"expected an AnnData, got a {type(adata).__name__}. Fix: wrap the matrix first, e.g. "
            "anndata.AnnData(X=counts, obs=cell_table, var=gene_table), or read it with anndata.read_h5ad(path)."
        )
    n_obs, n_vars = adata.n_obs, adata.n_vars
    if n_obs == 0 or n_vars == 0:
        raise InputError(
            f"adata is empty: {n_obs} cells x {n_vars} genes. The model needs at least one cell and one gene. "
            "Fix: check the filtering or subsetting that produced it."
        )
    layers = [str(k) for k in adata.layers.keys()]
    if layer is not None and layer not in adata.layers:
        if layers:
            close = _closest(layer, layers)
            hint = f" (did you mean {_first(close)}?)" if close else ""
            raise InputError(
                f"layer={layer!r} is not in adata.layers; available layers: {_first(layers, 20)}{hint}. "
                "Fix: pass one of them, or layer=None to use adata.X."
            )
        raise InputError(
            f"layer={layer!r} is not in adata.layers: adata has no layers. Fix: pass layer=None to use adata.X, "
            f'or store the raw counts first with adata.layers["{layer}"] = counts.'
        )
    if not adata.obs_names.is_unique:
        dups = adata.obs_names[adata.obs_names.duplicated()].unique()
        warnings.warn(
            f"adata has {len(dups):,} duplicated cell name(s) in adata.obs_names (first: {_first(list(dups))}); "
            "per-cell outputs indexed by cell name (get_normalized_expression, obs columns you add) would repeat "
            "them. Fix: adata.obs_names_make_unique() before setup_anndata.",
            InputWarning,
            stacklevel=2,
        )
    validate_obs_key(adata, "batch_key", batch_key)
    validate_obs_key(adata, "labels_key", labels_key)
    validate_covariates(
        adata,
        size_factor_key=size_factor_key,
        categorical_covariate_keys=categorical_covariate_keys,
        continuous_covariate_keys=continuous_covariate_keys,
    )

    where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    X = adata.layers[layer] if layer is not None else adata.X
    if X is None:
        fix = (
            f"pass the layer that holds the counts (available layers: {_first(layers, 20)})"
            if layers
            else "set adata.X to the counts matrix"
        )
        raise InputError(f"adata.X is None: there is no count matrix. Fix: {fix}.")
    others = [name for name in layers if name != layer]
    layer_hint = f"; available layers: {_first(others, 20)}" if others else ""
    scan = _scan(_as_matrix(X, where), where)
    names = _Names(adata.obs_names, adata.var_names)
    _raise_value_problems(scan, where, integer, names, layer_hint)

    empty_cells = np.flatnonzero(scan.row_sums == 0)
    if empty_cells.size and not allow_empty_cells:
        raise InputError(
            f"{empty_cells.size:,} of {n_obs:,} cells have zero total counts in {where} (first: "
            f"{names.cells(empty_cells)}); a cell without counts has no library size to model. "
            "Fix: remove them with sc.pp.filter_cells(adata, min_counts=1)."
        )
    empty_genes = np.flatnonzero(scan.col_nnz == 0)
    if empty_genes.size:
        message = (
            f"{empty_genes.size:,} of {n_vars:,} genes have zero counts in every cell of {where} (first: "
            f"{names.genes(empty_genes)}); they carry no information. "
            "Fix: remove them with sc.pp.filter_genes(adata, min_cells=1)."
        )
        if not allow_empty_genes:
            raise InputError(message)
        warnings.warn(message, InputWarning, stacklevel=2)
    return _summary(scan)


def validate_query(
    adata: Any,
    *,
    layer: str | None,
    batch_key: str | None,
    labels_key: str | None,
    model_batches: Sequence[Any],
    allow_new_batches: bool = False,
    where: str = "the query AnnData",
    size_factor_key: str | None = None,
    categorical_covariates: dict[str, Sequence[Any]] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
) -> None:
    """Check an AnnData that a trained model is asked to embed (a query, or any AnnData other than the model's own).

    The counts, the batch column and empty cells are checked as in :func:`validate_anndata`; beyond that every batch of
    the query must be one of the model's (encoder and decoder take the batch as input and have no weights for a new
    one; ``allow_new_batches`` lifts this for :func:`pyro_vmm.scvi._query.load_query_data`, which adds weights for them),
    and the labels column the model was set up with must exist (its values may be new: labels are only carried
    along, never used by the model).  The covariate columns the model was set up with must exist and pass
    :func:`validate_covariates`; ``categorical_covariates`` maps each categorical covariate to the model's categories,
    and a query value outside them is refused (the networks have no weights for it).
    """
    known = [str(b) for b in model_batches]
    for key, arg in ((batch_key, "batch_key"), (labels_key, "labels_key")):
        if key is not None and hasattr(adata, "obs") and key not in adata.obs.columns:
            fix = (
                f"add it with one of the model's batches, e.g. adata.obs[{key!r}] = {known[0]!r}"
                if arg == "batch_key"
                else f"the model does not use labels, any value will do: adata.obs[{key!r}] = 'unknown'"
            )
            raise InputError(
                f"{where} has no adata.obs[{key!r}] column, the {arg} the model was set up with. Fix: {fix}."
            )
    cov_keys = [*(categorical_covariates or {}), *(continuous_covariate_keys or [])]
    cov_keys += [size_factor_key] if size_factor_key is not None else []
    for key in cov_keys:
        if hasattr(adata, "obs") and key not in adata.obs.columns:
            raise InputError(
                f"{where} has no adata.obs[{key!r}] column, a covariate the model was set up with. Fix: add it "
                "(the model's decoder reads it for every cell)."
            )
    try:
        validate_anndata(
            adata,
            layer=layer,
            batch_key=batch_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=list(categorical_covariates or {}),
            continuous_covariate_keys=continuous_covariate_keys,
        )
    except InputError as err:
        place = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
        raise InputError(
            f"{where}: {err} Note: the model was set up with layer={layer!r}, so it reads a query's raw counts from "
            f"{place}; put them there."
        ) from None
    for key, categories in (categorical_covariates or {}).items():
        known_cats = [str(c) for c in categories]
        new = [str(v) for v in np.unique(np.asarray(adata.obs[key].astype(str))) if str(v) not in known_cats]
        if new:
            raise InputError(
                f"{where} has value(s) of the categorical covariate {key!r} the model was not trained on: "
                f"{_first(new)} in adata.obs[{key!r}] (the model's: {_first(known_cats, 20)}). The networks have no "
                f"weights for a new category of a covariate (only new batches can be mapped). Fix: set those cells to "
                f"one of the model's categories, e.g. adata.obs[{key!r}] = {known_cats[0]!r}, or train a model on all "
                "cells together."
            )
    if batch_key is not None and not allow_new_batches:
        batches = np.unique(np.asarray(adata.obs[batch_key].astype(str)))
        new = [str(b) for b in batches if str(b) not in known]
        if new:
            raise InputError(
                f"{where} has batch(es) the model was not trained on: {_first(new)} in adata.obs[{batch_key!r}] "
                f"(the model's batches: {_first(known, 20)}). VMM-scVI's encoder and decoder take the batch as input "
                "and have no weights for a new one. Fix: embed those cells as one of the model's batches, e.g. "
                f"adata.obs[{batch_key!r}] = {known[0]!r}, map them with VMMSCVI.load_query_data(adata, model) (new "
                "batch weights trained on the query, everything else frozen), or train on all cells together."
            )
