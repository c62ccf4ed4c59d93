"""Small real data shared by the tests and their subprocess workers (importable with ``tests/`` on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def kang_subset(path: str | Path, n_cells: int = 300, n_genes: int = 200, seed: int = 0):
    """``n_cells`` random cells x the ``n_genes`` highest-count genes of kang_ifnb_2800 (cells with counts only)."""
    import anndata

    adata = anndata.read_h5ad(path)
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(adata.n_obs, n_cells, replace=False))
    genes = np.sort(np.argsort(-np.asarray(adata.X.sum(0)).ravel())[:n_genes])
    sub = adata[cells, genes].copy()
    return sub[np.asarray(sub.X.sum(1)).ravel() > 0].copy()
