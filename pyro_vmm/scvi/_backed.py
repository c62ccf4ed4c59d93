r"""Rows of an on-disk (backed) AnnData matrix, read without loading the matrix.

``anndata.read_h5ad(path, backed="r")`` leaves ``X`` in the file: a CSR/CSC sparse dataset
(:class:`anndata.abc.CSRDataset`) or a dense ``h5py.Dataset``.  :class:`BackedMatrix` reads any set of rows from it
as a small in-memory matrix: the requested rows are sorted, rows less than ``max_gap`` apart are read as one
contiguous slice (one HDF5 read per run, the unwanted rows in between dropped), and the result comes back in the
requested order.  Minibatches drawn in blocks of consecutive rows
(:class:`~pyro_vmm.scvi._data.MinibatchSampler` with ``block_size > 1``) therefore cost a few reads each.

The object holds the file name and the dataset's path, not an open handle, when pickled (Lightning's spawned
data-parallel processes, DataLoader workers), and a forked process opens its own handle (HDF5 handles must not
cross a fork); inside one process the file is opened once, read-only.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from scipy import sparse as sp

__all__ = ["BackedMatrix", "is_backed"]


def is_backed(matrix: Any) -> bool:
    """``True`` for a matrix whose rows can be read from its HDF5 file (a backed AnnData's ``X``): a CSR sparse
    dataset or a dense h5py dataset.  (A backed CSC matrix reads rows only by scanning every column: it is loaded
    into memory instead.)"""
    import h5py

    if isinstance(matrix, h5py.Dataset):
        return True
    group = getattr(matrix, "group", None)
    return isinstance(group, h5py.Group) and getattr(matrix, "format", None) == "csr"


class BackedMatrix:
    """Read rows of an on-disk CSR or dense matrix (see the module docstring).

    Parameters
    ----------
    matrix
        A backed AnnData's ``X`` (``adata.X`` after ``read_h5ad(..., backed="r")``).
    max_gap
        Rows at most this far apart in the file are read by one slice.
    """

    def __init__(self, matrix: Any, max_gap: int = 64) -> None:
        if not is_backed(matrix):
            raise TypeError(f"not an on-disk matrix: {type(matrix).__name__}")
        node = getattr(matrix, "group", matrix)
        self.filename = str(node.file.filename)
        self.key = str(node.name)
        self.shape = tuple(int(s) for s in matrix.shape)
        self.format = getattr(matrix, "format", "dense")
        self.max_gap = int(max_gap)
        self._handle: Any = None
        self._data: Any = None
        self._pid: int | None = None

    # an open h5py file cannot be pickled: reopen in the receiving process
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_data": None, "_pid": None}

    def _dataset(self) -> Any:
        """The dense h5py dataset, or ``(data, indices, indptr)`` of the CSR group (anndata's on-disk format) with
        ``indptr`` read into memory (8 bytes per row) so that a run of rows costs two reads."""
        if self._data is not None and self._pid != os.getpid():  # forked: the parent's handle is not ours to use
            self._handle = self._data = None
        if self._data is None:
            import h5py

            self._pid = os.getpid()
            self._handle = h5py.File(self.filename, "r")
            node = self._handle[self.key]
            self._data = (node["data"], node["indices"], node["indptr"][:]) if isinstance(node, h5py.Group) else node
        return self._data

    def _slice(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        data = self._dataset()
        if self.format == "dense":
            return data[start:stop]
        values, indices, indptr = data
        lo, hi = int(indptr[start]), int(indptr[stop])
        return sp.csr_matrix(
            (values[lo:hi], indices[lo:hi], indptr[start : stop + 1] - lo), shape=(stop - start, self.shape[1])
        )

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = self._data = None

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix | np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) as CSR (sparse file) or ndarray (dense file), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for a matrix with {self.shape[0]} rows")
        unique = np.unique(rows)
        parts = []
        if unique.size:
            breaks = np.flatnonzero(np.diff(unique) > self.max_gap) + 1
            for run in np.split(unique, breaks):
                start, stop = int(run[0]), int(run[-1]) + 1
                block = self._slice(start, stop)
                parts.append(block[run - start] if stop - start != run.size else block)
        if self.format == "dense":
            stacked = np.concatenate(parts) if parts else np.zeros((0, self.shape[1]), dtype=self._dataset().dtype)
        else:
            stacked = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, self.shape[1]))
        if unique.size == rows.size and np.array_equal(unique, rows):
            return stacked
        return stacked[np.searchsorted(unique, rows)]
