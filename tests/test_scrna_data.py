"""scRNA data helpers on the real offline files: reading counts, HVG selection, the scVI PBMC metadata join."""

from __future__ import annotations

import shutil

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from pyro_vmm.data.scrna import (
    SHARED_DATASETS,
    check_counts,
    join_pbmc_metadata,
    load_shared,
    read_counts,
    select_hvg,
)


def _small_counts(n_obs=40, n_vars=30, seed=0, dense=False) -> anndata.AnnData:
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.0, size=(n_obs, n_vars)).astype(np.int32)
    adata = anndata.AnnData(X=x if dense else sparse.csr_matrix(x))
    adata.obs["batch"] = pd.Categorical(np.repeat(["a", "b"], n_obs // 2))
    return adata


def test_read_counts_keeps_csr_and_rejects_non_counts(tmp_path):
    path = tmp_path / "d.h5ad"
    ad = _small_counts(dense=True)
    ad.layers["counts"] = sparse.csc_matrix(ad.X)
    ad.X = np.log1p(ad.X.astype(np.float32))  # log-normalised X, counts in a layer (the lung-atlas layout)
    ad.write_h5ad(path)
    with pytest.raises(ValueError, match="non-integer"):
        read_counts(path)
    got = read_counts(path, layer="counts")
    assert sparse.issparse(got.X) and got.X.format == "csr"
    np.testing.assert_array_equal(got.X.toarray(), np.expm1(got.layers["original_X"]).round())
    with pytest.raises(KeyError, match="layer 'raw' not found"):
        read_counts(path, layer="raw")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_counts(tmp_path / "missing.h5ad")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not an .h5ad"):
        read_counts(tmp_path / "x.csv")
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    with pytest.raises(ValueError, match="could not read"):
        read_counts(tmp_path / "bad.h5ad")


def test_check_counts_flags_negative_and_fractional_values():
    check_counts(sparse.csr_matrix(np.array([[0, 2], [3.0, 0]])))
    with pytest.raises(ValueError, match="negative"):
        check_counts(sparse.csr_matrix(np.array([[0, -1.0]])))
    with pytest.raises(ValueError, match="non-integer"):
        check_counts(np.array([[0.5, 1.0]]))
    check_counts(np.array([[0.5, 1.0]]), require_integer=False)


@pytest.mark.parametrize("name", ["cellbench_3cl", "zeisel_cortex_subset"])
def test_load_shared_and_hvg_subset_on_real_files(shared_data, name):
    adata = load_shared(name, shared_data / "scrna")
    assert adata.X.format == "csr" and {"batch", "cell_type"} <= set(adata.obs)
    batch_key = "batch" if adata.obs["batch"].nunique() > 1 else None
    hvg = select_hvg(adata, n_top_genes=500, batch_key=batch_key)
    assert hvg.shape == (adata.n_obs, 500)
    assert sparse.issparse(hvg.X) and hvg.X.format == "csr"
    assert "highly_variable" not in adata.var  # the input is untouched
    # raw counts of the selected genes, in their original order
    idx = adata.var_names.get_indexer(hvg.var_names)
    assert np.all(np.diff(idx) > 0)
    assert (hvg.X != adata.X[:, idx]).nnz == 0
    # the same genes scanpy's seurat_v3 selection flags on the full matrix (batch-aware when there are batches)
    import scanpy as sc

    ref = adata.copy()
    sc.pp.highly_variable_genes(ref, flavor="seurat_v3", n_top_genes=500, batch_key=batch_key)
    assert set(hvg.var_names) == set(ref.var_names[ref.var["highly_variable"]])


def test_select_hvg_keeps_everything_when_asked_for_more_genes_than_exist():
    ad = _small_counts()
    out = select_hvg(ad, n_top_genes=10_000)
    assert out.shape == ad.shape and out.var["highly_variable"].all()
    with pytest.raises(ValueError, match="batch_key='donor' is not a column"):
        select_hvg(ad, n_top_genes=10, batch_key="donor")


def test_load_shared_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data set"):
        load_shared("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="kang_ifnb_2800.h5ad"):
        load_shared("kang_ifnb_2800", tmp_path)
    assert "kang_ifnb_2800" in SHARED_DATASETS


def _fake_10x_runs(metadata, gene_info, seed=0):
    """Synthetic 10x pbmc8k / pbmc4k runs whose barcodes are the metadata's (+ extras) and genes the gene_info's."""
    rng = np.random.default_rng(seed)
    barcodes = metadata["barcodes"].index.values.astype(str)
    is4k = metadata["design"]["batchpbmc4k"].to_numpy().astype(bool)
    genes = list(gene_info["ENSG"].astype(str))[5:] + ["ENSG_EXTRA1", "ENSG_EXTRA2"]  # 5 missing, 2 extra
    runs = []
    for name, cells in (("pbmc8k", barcodes[~is4k]), ("pbmc4k", barcodes[is4k])):
        cells = np.concatenate([cells[~np.char.endswith(cells, "-11")], [f"EXTRA{name}-1"]])
        x = sparse.random(len(cells), len(genes), density=0.01, format="csr", random_state=rng, dtype=np.float32)
        x.data = np.ceil(x.data * 5)
        run = anndata.AnnData(X=x, obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes))
        runs.append(run)
    return runs


def test_pbmc_metadata_join_matches_scvi_tools_on_the_real_files(shared_data, tmp_path, monkeypatch):
    fmt = shared_data / "formats" / "scvi_pbmc"
    gene_info = pd.read_csv(fmt / "gene_info_pbmc.csv")
    metadata = pd.read_pickle(fmt / "pbmc_metadata.pickle")  # an old-pandas pickle: plain pickle.load fails
    runs = _fake_10x_runs(metadata, gene_info)

    # scvi-tools' own loader on the same (offline) inputs: downloads patched out, 10x runs replaced by ours
    import scvi.data._built_in_data._pbmc as scvi_pbmc

    for f in ("gene_info_pbmc.csv", "pbmc_metadata.pickle"):
        shutil.copy(fmt / f, tmp_path / f)
    monkeypatch.setattr(scvi_pbmc, "_download", lambda *a, **k: None)
    monkeypatch.setattr(scvi_pbmc, "_load_dataset_10x", lambda name, **k: runs[0 if name == "pbmc8k" else 1].copy())
    ref = scvi_pbmc._load_pbmc_dataset(save_path=str(tmp_path))

    counts = anndata.concat(runs, label="batch", keys=["pbmc8k", "pbmc4k"], index_unique=None)
    got = join_pbmc_metadata(counts, gene_info, metadata)

    assert got.shape == ref.shape == (11990, 3346 - 5)
    assert list(got.var_names) == list(ref.var_names)
    assert (got.X != ref.X).nnz == 0
    np.testing.assert_array_equal(got.obs["labels"].to_numpy(), ref.obs["labels"].to_numpy())
    np.testing.assert_array_equal(got.obs["cell_type"].astype(str), ref.obs["str_labels"].astype(str))
    np.testing.assert_array_equal((got.obs["batch"] == "pbmc4k").astype(int), ref.obs["batch"].to_numpy())
    np.testing.assert_allclose(got.obsm["qc_pc"], ref.obsm["qc_pc"])
    # the curated label counts of the real metadata (49 filtered 4k cells excluded)
    assert got.obs["cell_type"].value_counts()["CD4 T cells"] == int(
        (metadata["clusters"][~np.char.endswith(metadata["barcodes"].index.values.astype(str), "-11")] == 2).sum()
    )
    assert got.X.format == "csr"


def test_pbmc_metadata_join_matches_barcodes_within_their_batch(shared_data):
    fmt = shared_data / "formats" / "scvi_pbmc"
    gene_info = pd.read_csv(fmt / "gene_info_pbmc.csv")
    metadata = pd.read_pickle(fmt / "pbmc_metadata.pickle")  # an old-pandas pickle: plain pickle.load fails
    runs = _fake_10x_runs(metadata, gene_info)
    first_8k = runs[0].obs_names[0]
    # the 4k run also has a cell with the first 8k barcode: the 8k cell must still be the one joined
    dup = runs[1][:1].copy()
    dup.obs_names = [first_8k]
    dup.X = sparse.csr_matrix(np.full((1, dup.n_vars), 99, dtype=np.float32))
    runs[1] = anndata.concat([runs[1], dup])
    counts = anndata.concat(runs, label="batch", keys=["pbmc8k", "pbmc4k"], index_unique=None)
    got = join_pbmc_metadata(counts, gene_info, metadata)
    assert got.obs_names[0] == first_8k and got.obs["batch"].iloc[0] == "pbmc8k"
    assert got.X[0].max() < 99
    with pytest.raises(KeyError, match="lacks 'clusters'"):
        join_pbmc_metadata(counts, gene_info, {k: v for k, v in metadata.items() if k != "clusters"})


def _kang_with_a_small_batch(shared_data, n_small: int) -> anndata.AnnData:
    """300 CTRL cells and ``n_small`` STIM cells of kang_ifnb_2800, genes detected in >= 3 cells: seurat_v3's loess
    cannot fit the small batch."""
    adata = load_shared("kang_ifnb_2800", shared_data / "scrna")
    batch = adata.obs["batch"].astype(str).to_numpy()
    idx = np.r_[np.flatnonzero(batch == "CTRL")[:300], np.flatnonzero(batch == "STIM")[:n_small]]
    sub = adata[idx].copy()
    return sub[:, np.asarray((sub.X > 0).sum(axis=0)).ravel() >= 3].copy()


def test_select_hvg_leaves_a_batch_too_small_for_seurat_v3_out_with_a_warning(shared_data):
    import scanpy as sc

    sub = _kang_with_a_small_batch(shared_data, 40)
    with pytest.raises(ValueError):  # what scanpy does on its own
        sc.pp.highly_variable_genes(sub, flavor="seurat_v3", n_top_genes=500, batch_key="batch", inplace=False)
    with pytest.warns(UserWarning, match=r"'STIM' \(40 cells\)"):
        hvg = select_hvg(sub, n_top_genes=500, batch_key="batch")
    assert hvg.shape == (sub.n_obs, 500)  # every cell kept, the genes ranked without the unfittable batch
    assert hvg.uns["hvg"]["batch_key"] is None  # one fittable batch left: pooled ranking
    pooled = sc.pp.highly_variable_genes(sub, flavor="seurat_v3", n_top_genes=500, inplace=False)
    assert set(hvg.var_names) == set(sub.var_names[pooled["highly_variable"].to_numpy()])


def test_select_hvg_refuses_a_batch_column_with_a_missing_value_before_computing():
    ad = _small_counts()
    ad.obs["batch"] = ad.obs["batch"].astype(str).astype(object)
    ad.obs.iloc[3, ad.obs.columns.get_loc("batch")] = np.nan  # strings and one NaN: numpy's sort would raise TypeError
    with pytest.raises(ValueError, match=r"adata.obs\['batch'\] \(batch_key\) has 1 missing \(NaN\) value"):
        select_hvg(ad, n_top_genes=10, batch_key="batch")
