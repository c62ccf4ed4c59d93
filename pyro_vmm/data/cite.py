"""The offline CITE-seq set: two 10x PBMC batches (2 x 200 cells) with RNA and antibody-derived (protein) counts."""

from __future__ import annotations

import os
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

__all__ = ["CITE_FILES", "DEFAULT_CITE_DIR", "load_cite"]

DEFAULT_CITE_DIR = Path("..") / "shared" / "data" / "cite"
#: batch name -> file in the CITE folder
CITE_FILES = {"pbmc_10k": "pbmc_10k_protein_v3_200.h5ad", "pbmc_5k": "pbmc_5k_protein_v3_200.h5ad"}


def load_cite(data_dir: str | os.PathLike = DEFAULT_CITE_DIR) -> anndata.AnnData:
    """Both batches in one AnnData: the genes and proteins they share (in the first file's order), RNA counts in
    ``X`` (CSR, float32), ``obs["batch"]`` (categorical), ``obsm["protein_expression"]`` a cells x proteins
    DataFrame (columns: the protein names without the ``_TotalSeqB`` suffix), ``uns["protein_names"]`` likewise."""
    parts = {}
    for batch, name in CITE_FILES.items():
        path = Path(data_dir) / name
        if not path.exists():
            raise FileNotFoundError(f"{str(path)!r} not found; pass data_dir= the folder holding the CITE .h5ad files")
        parts[batch] = anndata.read_h5ad(path)
    first, *rest = parts.values()
    genes = first.var_names[np.all([first.var_names.isin(a.var_names) for a in rest], axis=0)]
    proteins = [p for p in first.uns["protein_names"] if all(p in a.uns["protein_names"] for a in rest)]
    xs, ys, batches, names = [], [], [], []
    for batch, a in parts.items():
        xs.append(sparse.csr_matrix(a[:, genes].X, dtype=np.float32))
        col = {p: i for i, p in enumerate(a.uns["protein_names"])}
        ys.append(np.asarray(a.obsm["protein_expression"])[:, [col[p] for p in proteins]].astype(np.float32))
        batches += [batch] * a.n_obs
        names += [f"{batch}_{c}" for c in a.obs_names]
    short = [str(p).replace("_TotalSeqB", "") for p in proteins]
    out = anndata.AnnData(
        X=sparse.vstack(xs).tocsr(),
        obs=pd.DataFrame({"batch": pd.Categorical(batches, categories=list(parts))}, index=names),
        var=pd.DataFrame(index=genes.copy()),
    )
    out.obsm["protein_expression"] = pd.DataFrame(np.vstack(ys), index=names, columns=short)
    out.uns["protein_names"] = np.asarray(short)
    return out
