"""Checks of :mod:`pyro_vmm.validation` on ``obs`` keys, covariates, hyperparameters and gene lists."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._messages import N_SHOWN, InputError, _closest, _first


def validate_obs_key(adata: Any, arg: str, key: str | None) -> None:
    """``key`` (the argument ``arg``, e.g. ``"batch_key"`` or ``"--batch-key"``) is an ``adata.obs`` column without
    missing values; otherwise an :class:`InputError` that names the column and the fix.  ``None`` passes."""
    if key is None:
        return
    columns = [str(c) for c in adata.obs.columns if not str(c).startswith("_scvi_")]  # scvi-tools' own columns
    if key not in adata.obs.columns:
        close = _closest(key, columns)
        hint = f" Did you mean {_first(close)}?" if close else ""
        shown = _first(columns, 20) if columns else "none"
        raise InputError(
            f"{arg}={key!r} is not a column of adata.obs.{hint} Available columns: {shown}. "
            f"Fix: pass one of them, or {arg}=None."
        )
    values = adata.obs[key]
    missing = np.asarray(values.isna())
    n = int(missing.sum())
    if n:
        cells = _first(list(adata.obs_names[missing][: N_SHOWN + 1]))
        fill = (
            f'adata.obs[{key!r}] = adata.obs[{key!r}].cat.add_categories("unknown").fillna("unknown")'
            if str(values.dtype) == "category"
            else f'adata.obs[{key!r}] = adata.obs[{key!r}].fillna("unknown")'
        )
        raise InputError(
            f"adata.obs[{key!r}] ({arg}) has {n:,} missing (NaN) value(s) among {adata.n_obs:,} cells "
            f"(first: {cells}). Fix: give them a value of their own, {fill}, or drop those cells with "
            f"adata = adata[adata.obs[{key!r}].notna()].copy()."
        )


def _key_list(arg: str, keys: Any) -> list[str]:
    """A list of ``adata.obs`` column names (``None``: none); a single string is refused with the fix."""
    if keys is None:
        return []
    if isinstance(keys, str):
        raise InputError(f"{arg} must be a list of adata.obs columns, got the string {keys!r}. Fix: {arg}=[{keys!r}].")
    keys = list(keys)
    dups = sorted({str(k) for k in keys if keys.count(k) > 1})
    if dups:
        raise InputError(f"{arg} names {_first(dups)} more than once. Fix: list each column once.")
    return keys


def _check_numeric_obs(adata: Any, arg: str, key: str, positive: bool = False) -> None:
    """``adata.obs[key]`` is numeric and finite (and > 0 with ``positive``)."""
    values = adata.obs[key]
    if not (pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)):
        raise InputError(
            f"adata.obs[{key!r}] ({arg}) is not numeric (dtype {values.dtype}). Fix: convert it, e.g. "
            f"adata.obs[{key!r}] = adata.obs[{key!r}].astype(float), or register it as a categorical covariate."
        )
    x = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        raise InputError(
            f"adata.obs[{key!r}] ({arg}) has {int(bad.sum()):,} non-finite (NaN or inf) value(s) among "
            f"{adata.n_obs:,} cells (first: {_first(list(adata.obs_names[bad][: N_SHOWN + 1]))}). Fix: fill them "
            f"(e.g. with the column's mean) or drop those cells."
        )
    if positive and (x <= 0).any():
        bad = x <= 0
        raise InputError(
            f"adata.obs[{key!r}] ({arg}) has {int(bad.sum()):,} size factor(s) <= 0 (first: "
            f"{_first(list(adata.obs_names[bad][: N_SHOWN + 1]))}); a size factor is the cell's library size and "
            "must be positive. Fix: drop those cells, or compute the size factors from cells with counts."
        )


def validate_covariates(
    adata: Any,
    *,
    size_factor_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
) -> None:
    """The covariate columns of ``setup_anndata``: each exists in ``adata.obs`` without missing values; continuous
    covariates and size factors are numeric and finite; size factors are positive."""
    cats = _key_list("categorical_covariate_keys", categorical_covariate_keys)
    conts = _key_list("continuous_covariate_keys", continuous_covariate_keys)
    for key in cats:
        validate_obs_key(adata, "categorical_covariate_keys", key)
    for key in conts:
        validate_obs_key(adata, "continuous_covariate_keys", key)
        _check_numeric_obs(adata, "continuous_covariate_keys", key)
    if size_factor_key is not None:
        validate_obs_key(adata, "size_factor_key", size_factor_key)
        _check_numeric_obs(adata, "size_factor_key", size_factor_key, positive=True)


def validate_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an ``int`` >= 1 (e.g. a number of components K or latent dimensions D).

    Accepts Python/NumPy integers and whole floats (``10.0``); rejects ``None``, bools, strings, fractions, NaN/inf.
    """
    fix = f"Fix: pass a whole number >= 1, e.g. {name}=10."
    if value is None or isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be a positive integer, got {value!r}. {fix}")
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        if not math.isfinite(value) or value != math.floor(value):
            raise InputError(f"{name} must be a positive integer, got {value!r} (not a whole number). {fix}")
        value = int(value)
    try:
        number = operator.index(value)
    except TypeError:
        raise InputError(
            f"{name} must be a positive integer, got a {type(value).__name__} ({value!r}). {fix}"
        ) from None
    if number < 1:
        raise InputError(f"{name} must be >= 1, got {number}. {fix}")
    return int(number)


def validate_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as a finite ``float`` > 0 (e.g. a learning rate); rejects ``None``, bools, strings, NaN/inf."""
    fix = f"Fix: pass a finite number > 0, e.g. {name}=0.001."
    if value is None or isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a positive number, got a {type(value).__name__} ({value!r}). {fix}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"{name} must be a finite number > 0, got {number!r}. {fix}")
    return number


def validate_genes_match(
    reference_var_names: Sequence[Any], query_var_names: Sequence[Any], *, where: str = "query"
) -> None:
    """Check that a query (or re-loaded) AnnData has exactly the model's genes, in the model's order.

    Reports duplicated query genes, a pure reordering (with the first differing position), or the numbers and first
    names of missing and extra genes, each with the fix.
    """
    ref = [str(g) for g in reference_var_names]
    query = [str(g) for g in query_var_names]
    if ref == query:
        return
    seen: set[str] = set()
    dups = [g for g in query if g in seen or seen.add(g)]
    if dups:
        raise InputError(
            f"{where} has {len(dups):,} duplicated gene name(s) (first: {_first(dups)}), so its genes cannot be "
            "matched to the model's. Fix: make them unique with adata.var_names_make_unique() (or aggregate the "
            "duplicates) before matching to the model's genes."
        )
    fix = (
        "Fix: VMMSCVI.prepare_query_anndata(adata, model) (model: the model or the folder it was saved to) puts "
        f"adata on the model's {len(ref):,} genes in the model's order, in place."
    )
    ref_set, query_set = set(ref), set(query)
    if ref_set == query_set and len(ref) == len(query):
        i = next(i for i, (a, b) in enumerate(zip(ref, query, strict=True)) if a != b)
        raise InputError(
            f"{where} has the model's {len(ref):,} genes but in a different order (first difference at position {i}: "
            f"the model has {ref[i]!r}, {where} has {query[i]!r}). {fix}"
        )
    missing = [g for g in ref if g not in query_set]
    extra = [g for g in query if g not in ref_set]
    parts = [f"the model has {len(ref):,} genes, {where} has {len(query):,}"]
    if missing:
        parts.append(f"{len(missing):,} of the model's genes are missing from {where} (first: {_first(missing)})")
    if extra:
        parts.append(f"{len(extra):,} gene(s) of {where} are not in the model (first: {_first(extra)})")
    if missing:
        fix = (
            "Fix: VMMSCVI.prepare_query_anndata(adata, model) (model: the model or the folder it was saved to) adds "
            "the missing genes as all-zero columns (not measured) and orders the genes as the model's, in place."
        )
    raise InputError(f"the genes of {where} do not match the model's: " + "; ".join(parts) + f". {fix}")
