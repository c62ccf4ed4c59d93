"""Single-cell RNA-seq data: read raw counts, select highly variable genes, load the paper's data sets.

Every loader returns an :class:`~anndata.AnnData` in one layout: ``X`` = raw counts as a CSR matrix (never densified
here), ``obs["batch"]`` categorical (one level for single-batch sets) and ``obs["cell_type"]`` categorical when labels
exist.  The paper's data sets are fetched in the formats scvi-tools ships them, through scvi-tools' own download and
parsing functions, and cached in ``cache_dir`` (a download is written to a temporary folder and moved into place only
when complete).  ``load_shared`` reads the offline copies of ``../shared/data/scrna``.

Reference preprocessing (Stirn & Knowles 2024): cortex -> seurat_v3 HVGs (558), PBMC -> all 3346 genes, lung atlas ->
seurat_v3 HVGs (2000, batch-aware).  :func:`select_hvg` does the selection; the loaders do not.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

__all__ = [
    "SHARED_DATASETS",
    "check_counts",
    "join_pbmc_metadata",
    "load_cortex",
    "load_lung_atlas",
    "load_pbmc",
    "load_shared",
    "read_counts",
    "select_hvg",
]

#: offline data sets in ``../shared/data/scrna`` (file stem -> short description)
SHARED_DATASETS: dict[str, str] = {
    "kang_ifnb_2800": "Kang 2018 PBMC, CTRL/STIM (2 batches), 13 types",
    "cellbench_3cl": "CellBench 3 cell lines, CEL-seq2/Drop-seq (2 batches)",
    "cellbench_5cl": "CellBench 5 cell lines, 3 CEL-seq2 plates (3 batches)",
    "zeisel_cortex_subset": "Zeisel 2015 mouse cortex subset, 3 types (1 batch)",
    "sorted_pbmc": "Zheng 2017 sorted PBMC, 9 types (1 batch)",
    "paul15": "Paul 2015 myeloid progenitors, 19 clusters (1 batch)",
    "pbmc3k": "10x pbmc3k, no labels (1 batch)",
}

#: the offline folder, relative to the repository root (the working directory of tests and benchmarks)
DEFAULT_SHARED_DIR = Path("..") / "shared" / "data" / "scrna"

_LUNG_URL = "https://figshare.com/ndownloader/files/24539942"
_PBMC_META_URLS = {
    "gene_info_pbmc.csv": "https://github.com/YosefLab/scVI-data/raw/master/gene_info.csv",
    "pbmc_metadata.pickle": "https://github.com/YosefLab/scVI-data/raw/master/pbmc_metadata.pickle",
}
_PBMC_BATCHES = ("pbmc8k", "pbmc4k")


# ----------------------------------------------------------------------------------------------------------- counts
def _to_csr(matrix) -> sparse.csr_matrix:
    """CSR view of a count matrix without densifying a sparse one (a dense one is converted once)."""
    if sparse.issparse(matrix):
        return matrix.tocsr() if matrix.format != "csr" else matrix
    if hasattr(matrix, "to_memory"):  # backed / lazy arrays
        matrix = matrix.to_memory()
    return sparse.csr_matrix(np.asarray(matrix))


def check_counts(matrix, name: str = "X", require_integer: bool = True) -> None:
    """Raise ``ValueError`` unless ``matrix`` holds raw counts: finite, >= 0 and (by default) integer-valued.

    Only the stored non-zeros of a sparse matrix are inspected, so the check costs O(nnz) and never densifies.
    """
    values = matrix.data if sparse.issparse(matrix) else np.asarray(matrix).ravel()
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{name} is not numeric (dtype {values.dtype}); it must hold raw UMI/read counts")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or infinite values; it must hold raw UMI/read counts")
    if values.min() < 0:
        raise ValueError(
            f"{name} contains negative values (min {values.min():.3g}), so it is not raw counts (scaled or "
            "log-normalised data?); pass the layer with raw counts (--layer / layer=...)"
        )
    if require_integer and not np.issubdtype(values.dtype, np.integer):
        frac = np.abs(values - np.round(values))
        if frac.max() > 1e-6:
            raise ValueError(
                f"{name} contains non-integer values (e.g. {values[frac.argmax()]:.4g}), so it is not raw counts "
                "(log-normalised data?); pass the layer with raw counts (--layer / layer=...)"
            )


def _validate(adata: anndata.AnnData, require_integer: bool = True) -> None:
    """Check the counts in ``X`` with the project's validator (``pyro_vmm.validation``), else :func:`check_counts`."""
    try:
        from pyro_vmm.validation import validate_anndata
    except ImportError:
        check_counts(adata.X, require_integer=require_integer)
        return
    validate_anndata(adata, integer=require_integer, allow_empty_cells=True)


def read_counts(path: str | os.PathLike, layer: str | None = None, require_integer: bool = True) -> anndata.AnnData:
    """Read an ``.h5ad`` file whose ``X`` (or ``layers[layer]``) holds raw counts; return it with the counts in ``X``.

    The count matrix is kept (or made) sparse CSR.  When ``layer`` is given its counts become ``X`` and the file's
    original ``X`` is kept as ``layers["original_X"]``.  Errors: ``FileNotFoundError`` for a missing file,
    ``ValueError`` for a file that is not h5ad or whose matrix is not counts, ``KeyError`` for a missing layer.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; pass the path to an .h5ad file")
    if path.is_dir() or path.suffix.lower() != ".h5ad":
        raise ValueError(f"{str(path)!r} is not an .h5ad file; convert it first (e.g. scanpy.read_10x_mtx(...).write_h5ad)")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many types for a corrupt file
        raise ValueError(f"could not read {str(path)!r} as an AnnData .h5ad file ({type(err).__name__}: {err})") from err
    if layer is not None:
        if layer not in adata.layers:
            raise KeyError(
                f"layer {layer!r} not found in {path.name}; available layers: {sorted(adata.layers) or 'none'} "
                "(omit --layer to use X)"
            )
        counts = _to_csr(adata.layers[layer])
        if adata.X is not None:
            adata.layers["original_X"] = adata.X
        del adata.layers[layer]
        adata.X = counts
    else:
        adata.X = _to_csr(adata.X)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"{path.name} is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    _validate(adata, require_integer=require_integer)
    return adata


def select_hvg(
    adata: anndata.AnnData, n_top_genes: int = 2000, batch_key: str | None = None, layer: str | None = None
) -> anndata.AnnData:
    """Subset to the ``n_top_genes`` seurat_v3 highly variable genes (batch-aware when ``batch_key`` is given).

    seurat_v3 ranks genes by the variance of counts standardised with a loess fit of log-variance on log-mean,
    computed per batch and merged by the number of batches a gene is highly variable in.  Returns a copy holding the
    raw counts of the selected genes (in their original order) with ``var["highly_variable_rank"]``; the input is not
    modified.  With ``n_top_genes >= n_vars`` (or <= 0) all genes are kept.

    The loess fit fails on a batch of a few dozen cells (too few distinct means: ``reciprocal condition number``).
    Such batches are left out of the ranking, with a warning naming them (their cells are kept, and get the genes
    the other batches select); if fewer than two batches can be fitted, the genes are ranked on all cells pooled.
    A ``batch_key`` column that is missing or has missing values is refused before anything is computed.
    """
    from pyro_vmm.validation import validate_obs_key

    validate_obs_key(adata, "batch_key", batch_key)
    if n_top_genes <= 0 or n_top_genes >= adata.n_vars:
        out = adata.copy()
        out.var["highly_variable"] = True
        return out
    # seurat_v3 needs genes with some variance inside every batch it fits; all-zero genes are never selected anyway
    expressed = np.asarray((adata.layers[layer] if layer else adata.X).sum(axis=0)).ravel() > 0
    view = adata[:, expressed] if not expressed.all() else adata
    if n_top_genes >= view.n_vars:
        out = view.copy()
        out.var["highly_variable"] = True
        return out
    stats, used_key = _seurat_v3_with_fallback(view, n_top_genes, batch_key, layer)
    stats = stats.reindex(view.var_names) if stats.index.isin(view.var_names).all() else stats.set_axis(view.var_names)
    mask = stats["highly_variable"].to_numpy(bool)
    out = view[:, mask].copy()
    out.var["highly_variable"] = True
    out.var["highly_variable_rank"] = stats.loc[mask, "highly_variable_rank"].to_numpy()
    out.uns["hvg"] = {"flavor": "seurat_v3", "n_top_genes": int(n_top_genes), "batch_key": used_key}
    return out


def _seurat_v3(view: anndata.AnnData, n_top_genes: int, batch_key: str | None, layer: str | None) -> pd.DataFrame:
    import scanpy as sc

    return sc.pp.highly_variable_genes(
        view, flavor="seurat_v3", n_top_genes=n_top_genes, batch_key=batch_key, layer=layer, inplace=False
    )


def _seurat_v3_with_fallback(
    view: anndata.AnnData, n_top_genes: int, batch_key: str | None, layer: str | None
) -> tuple[pd.DataFrame, str | None]:
    """seurat_v3 statistics of ``view``'s genes and the batch key they were ranked with (see :func:`select_hvg`)."""
    if batch_key is None or view.obs[batch_key].nunique() < 2:
        return _seurat_v3(view, n_top_genes, None, layer), None
    try:
        return _seurat_v3(view, n_top_genes, batch_key, layer), batch_key
    except ValueError as err:  # skmisc's loess: ValueError(b"reciprocal condition number ...") and the like
        first_error = err
    batches = view.obs[batch_key].astype(str).to_numpy()
    failed = []
    for b in pd.unique(batches):
        try:
            _seurat_v3(view[batches == b], n_top_genes, None, layer)
        except ValueError:
            failed.append(str(b))
    sizes = {b: int((batches == b).sum()) for b in failed}
    kept = ~np.isin(batches, failed)
    left = pd.unique(batches[kept])
    what = ", ".join(f"{b!r} ({n} cells)" for b, n in sizes.items()) or "none singly"
    if len(left) >= 2 and failed:
        warnings.warn(
            f"seurat_v3 cannot fit its variance trend in batch(es) {what} of obs[{batch_key!r}] (too few cells: "
            f"{first_error}); those batches are left out of the gene ranking (their cells are kept)",
            stacklevel=3,
        )
        try:
            return _seurat_v3(view[kept], n_top_genes, batch_key, layer), batch_key
        except ValueError:
            pass
    warnings.warn(
        f"batch-aware seurat_v3 failed on obs[{batch_key!r}] (batches that cannot be fitted: {what}; {first_error}); "
        "ranking the genes on all cells pooled instead",
        stacklevel=3,
    )
    return _seurat_v3(view, n_top_genes, None, layer), None


def _standardize(adata: anndata.AnnData, batch, cell_type=None) -> anndata.AnnData:
    """The common layout: CSR counts in X, categorical ``obs["batch"]`` and ``obs["cell_type"]``."""
    adata.X = _to_csr(adata.X)
    adata.obs["batch"] = pd.Categorical(np.broadcast_to(np.asarray(batch, dtype=object), (adata.n_obs,)).astype(str))
    if cell_type is not None:
        adata.obs["cell_type"] = pd.Categorical(np.asarray(cell_type).astype(str))
    return adata


# ------------------------------------------------------------------------------------------------ downloads, cache
def _cached_download(url: str, cache_dir: str | os.PathLike, filename: str) -> Path:
    """Download ``url`` to ``cache_dir/filename`` unless it is there; a partial download never lands in the cache."""
    from scvi.data._download import _download

    target = Path(cache_dir) / filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        _download(url, tmp, filename)
        os.replace(Path(tmp) / filename, target)
    return target


def load_cortex(cache_dir: str | os.PathLike = "data") -> anndata.AnnData:
    """Zeisel et al. 2015 mouse cortex (3005 cells x 19972 genes, 7 level-1 types), as ``scvi.data.cortex`` ships it.

    Downloaded from the Linnarsson lab once and cached as ``cache_dir/expression.bin``; parsed by scvi-tools'
    ``_load_cortex_txt``.  One batch.  ``obs["precise_labels"]`` keeps the 47 level-2 classes.
    """
    from scvi.data._built_in_data._cortex import _load_cortex_txt

    url = "https://storage.googleapis.com/linnarsson-lab-www-blobs/blobs/cortex/expression_mRNA_17-Aug-2014.txt"
    path = _cached_download(url, cache_dir, "expression.bin")
    adata = _load_cortex_txt(str(path))
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    return _standardize(adata, batch="0", cell_type=adata.obs["cell_type"])


def join_pbmc_metadata(
    counts: anndata.AnnData, gene_info: pd.DataFrame, metadata: Mapping[str, object]
) -> anndata.AnnData:
    """Join 10x PBMC 8k + 4k counts with scVI's curated metadata (the label/batch join of ``scvi.data.pbmc_dataset``).

    ``counts``: the two 10x matrices stacked (8k first), ``obs_names`` = 10x barcodes, ``obs["batch"]`` = 0/"0"/
    "pbmc8k" for PBMC 8k and 1/"1"/"pbmc4k" for PBMC 4k, ``var_names`` = Ensembl ids.  ``gene_info``: the
    ``gene_info_pbmc.csv`` table (column ``ENSG``); ``metadata``: the ``pbmc_metadata.pickle`` dict.

    Cells are the metadata's barcodes found in ``counts``, in metadata order (49 PBMC 4k barcodes ending in ``-11``
    were filtered by 10x and are absent); genes are the ``gene_info`` genes present, in its order.  Unlike
    scvi-tools, a barcode is matched within its own batch (the metadata's ``design["batchpbmc4k"]``), so a barcode
    shared by both runs cannot pull in the other run's cell.  Returns the standard layout plus ``obs["labels"]``
    (integer codes into ``uns["cell_types"]``) and the metadata's ``design``, ``raw_qc``, ``normalized_qc`` and
    ``qc_pc`` in ``obsm``.
    """
    for key in ("barcodes", "clusters", "list_clusters", "design", "raw_qc", "normalized_qc", "qc_pc"):
        if key not in metadata:
            raise KeyError(f"PBMC metadata lacks {key!r}; pass the dict from scVI's pbmc_metadata.pickle")
    if "ENSG" not in gene_info:
        raise KeyError("gene_info has no 'ENSG' column; pass scVI's gene_info_pbmc.csv")
    if "batch" not in counts.obs:
        raise KeyError("counts.obs['batch'] is required (0 / 'pbmc8k' for PBMC 8k, 1 / 'pbmc4k' for PBMC 4k)")
    names = {"0": 0, "1": 1, "pbmc8k": 0, "pbmc4k": 1}
    try:
        count_batch = np.array([names[str(b)] for b in counts.obs["batch"]], dtype=np.int64)
    except KeyError as err:
        raise ValueError(f"unknown PBMC batch {err.args[0]!r}; use 0/1 or 'pbmc8k'/'pbmc4k'") from err

    meta_barcodes = np.asarray(metadata["barcodes"].index.values).ravel().astype(str)
    meta_batch = np.asarray(metadata["design"]["batchpbmc4k"]).astype(np.int64)
    index = {(int(b), str(bc)): i for i, (b, bc) in enumerate(zip(count_batch, counts.obs_names, strict=True))}
    rows = np.array([index.get((b, bc), -1) for b, bc in zip(meta_batch, meta_barcodes, strict=True)])
    found = rows >= 0
    if not found.any():
        raise ValueError("no PBMC metadata barcode matches the count matrix; are these the 10x pbmc8k + pbmc4k runs?")
    genes = [g for g in gene_info["ENSG"].astype(str) if g in set(counts.var_names)]
    adata = counts[rows[found]][:, genes].copy()
    adata.obs_names = meta_barcodes[found]
    adata.obs_names_make_unique()
    for key in ("design", "raw_qc", "normalized_qc"):
        frame = metadata[key][found].copy()
        frame.index = adata.obs_names
        adata.obsm[key] = frame
    adata.obsm["qc_pc"] = np.asarray(metadata["qc_pc"])[found]
    cell_types = np.asarray(metadata["list_clusters"]).astype(str)
    labels = np.asarray(metadata["clusters"]).astype(np.int64)[found]
    adata.obs["labels"] = labels
    adata.uns["cell_types"] = cell_types
    adata.var["n_counts"] = np.asarray(adata.X.sum(axis=0)).ravel()
    return _standardize(adata, batch=np.asarray(_PBMC_BATCHES)[meta_batch[found]], cell_type=cell_types[labels])


def load_pbmc(cache_dir: str | os.PathLike = "data") -> anndata.AnnData:
    """scVI's PBMC set: 10x PBMC 8k + 4k (2 batches), 3346 genes, 9 curated types (~11990 cells).

    The count matrices are fetched and parsed with scvi-tools' ``_load_dataset_10x`` (cached under
    ``cache_dir/pbmc8k`` and ``cache_dir/pbmc4k``), the metadata files from the scVI-data repository; the join is
    :func:`join_pbmc_metadata`.
    """
    from scvi.data._built_in_data._dataset_10x import _load_dataset_10x

    files = {name: _cached_download(url, cache_dir, name) for name, url in _PBMC_META_URLS.items()}
    gene_info = pd.read_csv(files["gene_info_pbmc.csv"], sep=",")
    metadata = pd.read_pickle(files["pbmc_metadata.pickle"])  # written by an old pandas: needs pandas' unpickler
    runs = [
        _load_dataset_10x(name, save_path=str(cache_dir), var_names="gene_ids", remove_extracted_data=True)
        for name in _PBMC_BATCHES
    ]
    counts = anndata.concat(runs, join="inner", label="batch", keys=list(_PBMC_BATCHES), index_unique=None)
    return join_pbmc_metadata(counts, gene_info, metadata)


def load_lung_atlas(cache_dir: str | os.PathLike = "data") -> anndata.AnnData:
    """The scIB human lung atlas (32472 cells x 15148 genes, 16 batches, 17 types), from figshare file 24539942.

    In this file ``X`` is log-transformed scran-normalised expression and the counts (SoupX-corrected, so partly
    non-integer) live in ``layers["counts"]``; they are moved into ``X`` (the log values stay in
    ``layers["original_X"]``).  The reference code instead trained on the log values in ``X``.
    """
    path = _cached_download(_LUNG_URL, cache_dir, "lung_atlas.h5ad")
    adata = read_counts(path, layer="counts", require_integer=False)
    return _standardize(adata, batch=adata.obs["batch"], cell_type=adata.obs["cell_type"])


def load_shared(name: str, data_dir: str | os.PathLike = DEFAULT_SHARED_DIR) -> anndata.AnnData:
    """Read one of the offline sets in ``data_dir`` (default ``../shared/data/scrna``); see :data:`SHARED_DATASETS`."""
    if name not in SHARED_DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(SHARED_DATASETS)}")
    path = Path(data_dir) / f"{name}.h5ad"
    if not path.exists():
        raise FileNotFoundError(
            f"{str(path)!r} not found; pass data_dir= the folder holding the shared .h5ad files "
            "(../shared/data/scrna from the repository root)"
        )
    return read_counts(path)

