"""Input checks that fail early with one clear message: what is wrong, where it is, and how to fix it.

Every check raises :class:`InputError` (a ``ValueError``, so the command line turns it into one error line and exit
code 2).  Count matrices are scanned without densifying: for scipy sparse matrices only the stored values
(``.data``) are inspected, and backed AnnData files are read in row (CSR, dense) or column (CSC) chunks.

Typical use, from a model's ``setup_anndata``::

    from pyro_vmm.validation import validate_anndata, validate_positive_int
    validate_anndata(adata, layer="counts", batch_key="batch", labels_key="cell_type")
    n_components = validate_positive_int("n_components", n_components)
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

__all__ = [
    "CountsSummary",
    "InputError",
    "InputWarning",
    "validate_obs_key",
    "validate_anndata",
    "validate_counts",
    "validate_genes_match",
    "validate_positive_float",
    "validate_positive_int",
]

#: about this many matrix entries are held in memory at once when a dense or backed matrix is scanned
CHUNK_ENTRIES = 1 << 22
#: how many names a message lists before it writes "..."
N_SHOWN = 5


class InputError(ValueError):
    """A user input (data, key, hyperparameter, file) is unusable; the message says where and how to fix it."""


class InputWarning(UserWarning):
    """A user input is usable but probably not what was intended (e.g. genes without any count)."""


@dataclass(frozen=True)
class CountsSummary:
    """What a successful count-matrix check saw."""

    n_cells: int
    n_genes: int
    n_nonzero: int
    max_value: float
    is_integer: bool
    n_empty_cells: int
    n_empty_genes: int


# ---------------------------------------------------------------------------------------------------------------
# helpers for messages
# ---------------------------------------------------------------------------------------------------------------
def _first(names: Sequence[Any], n: int = N_SHOWN) -> str:
    shown = ", ".join(repr(str(x)) for x in list(names[:n]))
    return shown + (", ..." if len(names) > n else "")


def _closest(key: str, choices: Sequence[str]) -> list[str]:
    choices = [str(c) for c in choices]
    folded = [c for c in choices if c.lower() == key.lower() and c != key]
    return folded + [c for c in difflib.get_close_matches(key, choices, n=3, cutoff=0.6) if c not in folded]


class _Names:
    """Turns (row, column) positions into 'cell 'x' (row 3), gene 'y' (column 7)' when names are known."""

    def __init__(self, obs_names: Sequence | None = None, var_names: Sequence | None = None) -> None:
        self.obs, self.var = obs_names, var_names

    def cell(self, i: int) -> str:
        return f"cell {str(self.obs[i])!r} (row {i})" if self.obs is not None else f"row {i}"

    def gene(self, j: int) -> str:
        return f"gene {str(self.var[j])!r} (column {j})" if self.var is not None else f"column {j}"

    def at(self, pos: tuple[int, int, float]) -> str:
        return f"{self.cell(pos[0])}, {self.gene(pos[1])}"

    @staticmethod
    def _positions(idx: np.ndarray) -> str:
        return ", ".join(str(int(i)) for i in idx[:N_SHOWN]) + (", ..." if len(idx) > N_SHOWN else "")

    def cells(self, idx: np.ndarray) -> str:
        if self.obs is None:
            return f"rows {self._positions(idx)}"
        return _first([self.obs[i] for i in idx[: N_SHOWN + 1]])

    def genes(self, idx: np.ndarray) -> str:
        if self.var is None:
            return f"columns {self._positions(idx)}"
        return _first([self.var[j] for j in idx[: N_SHOWN + 1]])


# ---------------------------------------------------------------------------------------------------------------
# one pass over a count matrix
# ---------------------------------------------------------------------------------------------------------------
class _Scan:
    """Accumulates counts and first positions of bad values, per-cell totals and per-gene non-zeros, chunk by chunk."""

    KINDS = ("nan", "inf", "negative", "fraction")

    def __init__(self, n_obs: int, n_vars: int) -> None:
        self.shape = (n_obs, n_vars)
        self.count = dict.fromkeys(self.KINDS, 0)
        self.first: dict[str, tuple[int, int, float] | None] = dict.fromkeys(self.KINDS)
        self.min_value = math.inf
        self.max_value = -math.inf
        self.nnz = 0
        self.row_sums = np.zeros(n_obs, dtype=np.float64)
        self.col_nnz = np.zeros(n_vars, dtype=np.int64)

    def _values(self, values: np.ndarray, locate) -> None:
        """``values``: stored values of a chunk; ``locate(i) -> (row, col)`` of the i-th value."""
        if values.size == 0:
            return
        if values.dtype.kind in "iu":
            masks = {"negative": values < 0} if values.dtype.kind == "i" else {}
            finite = values
        else:
            nan = np.isnan(values)
            inf = np.isinf(values)
            finite_mask = ~(nan | inf)
            masks = {
                "nan": nan,
                "inf": inf,
                "negative": values < 0,  # NaN compares False
                "fraction": finite_mask & (values != np.floor(np.where(finite_mask, values, 0))),
            }
            finite = values[finite_mask]
        for kind, mask in masks.items():
            n = int(np.count_nonzero(mask))
            if n:
                if self.first[kind] is None:
                    i = int(np.flatnonzero(mask)[0])
                    self.first[kind] = (*locate(i), float(values.flat[i]))
                self.count[kind] += n
        if finite.size:
            self.min_value = min(self.min_value, float(finite.min()))
            self.max_value = max(self.max_value, float(finite.max()))

    def dense(self, chunk: np.ndarray, row0: int, col0: int) -> None:
        ncol = chunk.shape[1]
        self._values(chunk.ravel(), lambda i: (row0 + i // ncol, col0 + i % ncol))
        nonzero = chunk != 0
        self.nnz += int(np.count_nonzero(nonzero))
        self.row_sums[row0 : row0 + chunk.shape[0]] += chunk.sum(axis=1, dtype=np.float64)
        self.col_nnz[col0 : col0 + ncol] += nonzero.sum(axis=0)

    def sparse(self, chunk: sp.spmatrix | sp.sparray, row0: int, col0: int) -> None:
        if chunk.format not in ("csr", "csc", "coo"):
            chunk = chunk.tocsr()
        data = np.asarray(chunk.data)
        if chunk.format == "coo":
            rows, cols = np.asarray(chunk.row), np.asarray(chunk.col)
            self._values(data, lambda i: (row0 + int(rows[i]), col0 + int(cols[i])))
            gene_of_value = cols
        else:
            indptr, indices = np.asarray(chunk.indptr), np.asarray(chunk.indices)

            def outer(i: int) -> int:
                return int(np.searchsorted(indptr, i, side="right") - 1)

            if chunk.format == "csr":
                self._values(data, lambda i: (row0 + outer(i), col0 + int(indices[i])))
                gene_of_value = indices
            else:
                self._values(data, lambda i: (row0 + int(indices[i]), col0 + outer(i)))
                gene_of_value = np.repeat(np.arange(chunk.shape[1]), np.diff(indptr))
        nonzero = data != 0
        self.nnz += int(np.count_nonzero(nonzero))
        self.row_sums[row0 : row0 + chunk.shape[0]] += np.asarray(chunk.sum(axis=1, dtype=np.float64)).ravel()
        self.col_nnz[col0 : col0 + chunk.shape[1]] += np.bincount(gene_of_value[nonzero], minlength=chunk.shape[1])


def _as_matrix(X: Any, where: str) -> Any:
    """Normalise to ndarray / scipy sparse / a backed (chunk-readable) object; reject what cannot be counts."""
    if X is None:
        raise InputError(f"{where} is None: there is no count matrix. Fix: pass a cells x genes matrix of counts.")
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu()
        if X.layout == torch.sparse_coo:
            X = X.coalesce()
            idx = X.indices().numpy()
            return sp.coo_matrix((X.values().numpy(), (idx[0], idx[1])), shape=tuple(X.shape))
        if X.layout == torch.sparse_csr:
            return sp.csr_matrix(
                (X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()), shape=tuple(X.shape)
            )
        if X.layout != torch.strided:
            X = X.to_dense()
        return (X.float() if X.dtype in (torch.bfloat16, torch.float16) else X).numpy()
    if sp.issparse(X) or isinstance(X, np.ndarray) and not isinstance(X, np.matrix):
        return X
    if getattr(X, "format", None) in ("csr", "csc") and hasattr(X, "shape"):  # anndata backed sparse dataset
        return X
    if type(X).__module__.startswith("h5py") or hasattr(X, "compute") and hasattr(X, "chunks"):  # h5py / dask
        return X
    if hasattr(X, "to_numpy"):  # pandas DataFrame
        return X.to_numpy()
    try:
        return np.asarray(X)
    except Exception as err:  # noqa: BLE001 -- any failure means "not a matrix"
        raise InputError(
            f"{where} is a {type(X).__name__}, which is not a count matrix. "
            "Fix: pass a numpy array, scipy sparse matrix, torch tensor or AnnData."
        ) from err


def _chunks(X: Any, block: int | None = None) -> Iterator[tuple[Any, int, int]]:
    """Yield ``(chunk, row0, col0)`` covering ``X``; in-memory sparse matrices come as one chunk (never densified)."""
    n_obs, n_vars = X.shape
    if sp.issparse(X):
        yield X, 0, 0
        return
    if getattr(X, "format", None) == "csc":  # backed CSC: columns are cheap, rows are not
        step = block or max(1, CHUNK_ENTRIES // max(n_obs, 1))
        for c0 in range(0, n_vars, step):
            yield X[:, c0 : c0 + step], 0, c0
        return
    step = block or max(1, CHUNK_ENTRIES // max(n_vars, 1))
    for r0 in range(0, n_obs, step):
        chunk = X[r0 : r0 + step]
        if hasattr(chunk, "compute"):
            chunk = chunk.compute()
        yield (chunk if sp.issparse(chunk) else np.asarray(chunk)), r0, 0


def _scan(X: Any, where: str, block: int | None = None) -> _Scan:
    shape = tuple(getattr(X, "shape", ()))
    if len(shape) != 2:
        raise InputError(
            f"{where} must be a 2-D cells x genes matrix, got shape {shape}. "
            "Fix: reshape to (n_cells, n_genes), e.g. X.reshape(1, -1) for a single cell."
        )
    dtype = getattr(X, "dtype", None)
    if dtype is not None and np.dtype(dtype).kind not in "biuf":
        raise InputError(
            f"{where} has dtype {np.dtype(dtype)}, not numbers. Fix: convert it to numeric counts, "
            "e.g. X.astype(np.float32) after checking why it holds non-numbers."
        )
    if shape[0] == 0 or shape[1] == 0:
        raise InputError(
            f"{where} is empty: {shape[0]} cells x {shape[1]} genes. The model needs at least one cell and one gene. "
            "Fix: check the filtering or subsetting that produced it."
        )
    scan = _Scan(*shape)
    for chunk, row0, col0 in _chunks(X, block):
        if sp.issparse(chunk):
            scan.sparse(chunk, row0, col0)
        else:
            scan.dense(np.asarray(chunk), row0, col0)
    return scan


def _raise_value_problems(scan: _Scan, where: str, integer: bool, names: _Names, layer_hint: str) -> None:
    raw = f'pass the raw counts instead (e.g. layer="counts"{layer_hint})'
    if scan.count["nan"]:
        raise InputError(
            f"{where} contains {scan.count['nan']:,} NaN value(s) (first at {names.at(scan.first['nan'])}). "
            f"Counts must be finite numbers. Fix: {raw}, or remove the cells with missing values."
        )
    if scan.count["inf"]:
        raise InputError(
            f"{where} contains {scan.count['inf']:,} infinite value(s) (first: {scan.first['inf'][2]} at "
            f"{names.at(scan.first['inf'])}). Counts must be finite numbers. Fix: {raw}, or remove those cells."
        )
    if scan.count["negative"]:
        first = scan.first["negative"]
        raise InputError(
            f"{where} contains {scan.count['negative']:,} negative value(s) (min {scan.min_value:g}; "
            f"first {first[2]:g} at {names.at(first)}). Counts cannot be negative: the data look centred or scaled "
            f"(e.g. by sc.pp.scale). Fix: {raw}; keep a copy before normalising with "
            'adata.layers["counts"] = adata.X.copy().'
        )
    if integer and scan.count["fraction"]:
        first = scan.first["fraction"]
        raise InputError(
            f"{where} contains {scan.count['fraction']:,} non-integer value(s) (first {first[2]:g} at "
            f"{names.at(first)}). The count likelihood needs raw integer counts; these look normalised or "
            f"log-transformed (e.g. by sc.pp.normalize_total / sc.pp.log1p). Fix: {raw}; keep a copy before "
            'normalising with adata.layers["counts"] = adata.X.copy(). If non-integer counts are intended '
            "(e.g. ambient-RNA corrected), validate with integer=False."
        )


def _summary(scan: _Scan) -> CountsSummary:
    return CountsSummary(
        n_cells=scan.shape[0],
        n_genes=scan.shape[1],
        n_nonzero=scan.nnz,
        max_value=scan.max_value if scan.nnz else 0.0,
        is_integer=scan.count["fraction"] == 0,
        n_empty_cells=int(np.count_nonzero(scan.row_sums == 0)),
        n_empty_genes=int(np.count_nonzero(scan.col_nnz == 0)),
    )


# ---------------------------------------------------------------------------------------------------------------
# public checks
# ---------------------------------------------------------------------------------------------------------------
def validate_counts(X: Any, *, where: str = "adata.X", integer: bool = True) -> CountsSummary:
    """Check a cells x genes count matrix: 2-D, numeric, non-empty, finite, non-negative and (if ``integer``) whole.

    ``X`` may be a numpy array, a scipy sparse matrix (only ``.data`` is read), a torch tensor (dense or sparse),
    a backed AnnData matrix (read in chunks) or anything ``np.asarray`` accepts.  ``where`` names ``X`` in messages.
    Returns a :class:`CountsSummary`; raises :class:`InputError` on the first problem found.
    """
    matrix = _as_matrix(X, where)
    scan = _scan(matrix, where)
    _raise_value_problems(scan, where, integer, _Names(), "")
    return _summary(scan)


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


def validate_anndata(
    adata: Any,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
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
