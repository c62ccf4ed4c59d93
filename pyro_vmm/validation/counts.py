"""Count-matrix checks of :mod:`pyro_vmm.validation`: one pass over the stored values, without densifying."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from ._messages import InputError, _Names

#: about this many matrix entries are held in memory at once when a dense or backed matrix is scanned
CHUNK_ENTRIES = 1 << 22


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
