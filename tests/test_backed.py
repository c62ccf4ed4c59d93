"""Streaming an on-disk (backed) AnnData: rows read from the file, block shuffling, training without loading X.

Data: 300 random cells x the 200 highest-count genes of ../shared/data/scrna/kang_ifnb_2800.h5ad.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

anndata = pytest.importorskip("anndata")
pytest.importorskip("scvi")

from pyro_vmm.scvi._backed import BackedMatrix, is_backed  # noqa: E402
from pyro_vmm.scvi import VMMSCVI, MinibatchSampler  # noqa: E402

from _data import kang_subset  # noqa: E402

TINY = dict(n_latent=4, n_hidden=32, n_clusters=8)
TRAIN = dict(batch_size=64, enable_progress_bar=False, early_stopping=False)


@pytest.fixture(scope="module")
def small_adata(shared_data):
    return kang_subset(shared_data / "scrna" / "kang_ifnb_2800.h5ad")


@pytest.fixture(params=["csr", "dense"])
def backed_file(request, small_adata, tmp_path):
    a = small_adata.copy()
    if request.param == "dense":
        a.X = a.X.toarray()
    path = tmp_path / f"small_{request.param}.h5ad"
    a.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    yield backed, np.asarray(small_adata.X.toarray())
    backed.file.close()


def _dense(x):
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)


@pytest.mark.parametrize("max_gap", [0, 1, 64])
def test_read_rows_returns_the_rows_asked_for_in_their_order(backed_file, max_gap):
    backed, expected = backed_file
    assert is_backed(backed.X)
    matrix = BackedMatrix(backed.X, max_gap=max_gap)
    rng = np.random.default_rng(0)
    for rows in (
        rng.choice(backed.n_obs, 50, replace=False),  # random order, gaps of every size
        np.arange(10, 42),  # one contiguous run
        np.array([5, 5, 200, 3, 5]),  # repeats and a far row
        np.array([backed.n_obs - 1, 0]),
    ):
        np.testing.assert_array_equal(_dense(matrix.read_rows(rows)), expected[rows])
    assert _dense(matrix.read_rows(np.array([], dtype=int))).shape == (0, backed.n_vars)
    with pytest.raises(IndexError, match="out of range"):
        matrix.read_rows(np.array([backed.n_obs]))


def test_a_backed_matrix_survives_pickling(backed_file):
    """Spawned data-parallel workers receive a pickled copy: it must reopen the file, not carry a dead handle."""
    backed, expected = backed_file
    matrix = BackedMatrix(backed.X)
    matrix.read_rows(np.array([1, 2]))  # opens the file in this process
    clone = pickle.loads(pickle.dumps(matrix))
    np.testing.assert_array_equal(_dense(clone.read_rows(np.array([7, 3]))), expected[[7, 3]])
    clone.close()
    matrix.close()


def test_in_memory_and_csc_matrices_are_not_streamed(small_adata, tmp_path):
    assert not is_backed(small_adata.X) and not is_backed(small_adata.X.toarray())
    a = small_adata.copy()
    a.X = a.X.tocsc()
    a.write_h5ad(tmp_path / "csc.h5ad")
    csc = anndata.read_h5ad(tmp_path / "csc.h5ad", backed="r")
    try:
        assert not is_backed(csc.X)  # rows of CSC cost a scan of every column: loaded instead
        with pytest.raises(TypeError, match="not an on-disk"):
            BackedMatrix(csc.X)
    finally:
        csc.file.close()


@pytest.mark.parametrize("n", [1, 15, 16, 17, 100])
def test_block_shuffle_is_a_permutation_of_whole_blocks(n):
    sampler = MinibatchSampler(n, 8, shuffle=True, seed=3, block_size=4)
    order = torch.cat(list(sampler)).numpy()
    assert sorted(order.tolist()) == list(range(n))
    starts = np.flatnonzero(order % 4 == 0)  # every block starts at a multiple of 4 and runs on consecutively
    for s in starts:
        block = order[s : s + min(4, n - order[s])]
        np.testing.assert_array_equal(block, np.arange(order[s], order[s] + len(block)))
    again = torch.cat(list(MinibatchSampler(n, 8, shuffle=True, seed=3, block_size=4))).numpy()
    np.testing.assert_array_equal(order, again)  # a function of (seed, epoch)


def test_block_size_one_is_the_plain_permutation():
    a = torch.cat(list(MinibatchSampler(50, 8, shuffle=True, seed=1, block_size=1)))
    gen = torch.Generator().manual_seed(1 * 1_000_003)
    torch.testing.assert_close(a, torch.randperm(50, generator=gen))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "16"])
def test_a_bad_block_size_is_refused(bad):
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        MinibatchSampler(10, 4, shuffle=True, block_size=bad)


def _train_latent(adata, **datasplitter_kwargs):
    VMMSCVI.setup_anndata(adata, batch_key="batch")
    model = VMMSCVI(adata, seed=6, **TINY)
    model.train(max_epochs=2, seed=6, datasplitter_kwargs=datasplitter_kwargs, **TRAIN)
    return model.get_latent_representation(), model


def test_streamed_training_equals_in_memory_training_with_the_same_shuffle(small_adata, tmp_path):
    path = tmp_path / "small.h5ad"
    small_adata.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        z_stream, model = _train_latent(backed)  # default: streamed, blocks of 16
        assert model.adata.isbacked
        z_memory, _ = _train_latent(small_adata.copy(), block_size=16)
        np.testing.assert_array_equal(z_stream, z_memory)
        z_plain, _ = _train_latent(small_adata.copy())  # per-cell shuffle: other minibatches, other numbers
        assert not np.array_equal(z_plain, z_memory)
    finally:
        backed.file.close()


def test_streaming_never_loads_the_matrix(small_adata, tmp_path, monkeypatch):
    """Setup, training, latent and clusters of a backed AnnData read rows only (``to_memory`` would load X)."""
    path = tmp_path / "small.h5ad"
    small_adata.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    read = []
    original = BackedMatrix.read_rows

    def counting(self, rows):
        read.append(len(rows))
        return original(self, rows)

    def refuse(*args, **kwargs):
        raise AssertionError("the backed matrix was loaded into memory")

    monkeypatch.setattr(type(backed.X), "to_memory", refuse)
    monkeypatch.setattr(BackedMatrix, "read_rows", counting)
    try:
        z, model = _train_latent(backed)
        assert model.get_cluster_assignments().shape == (backed.n_obs,)
        assert z.shape == (backed.n_obs, TINY["n_latent"])
        assert max(read) <= max(TRAIN["batch_size"], 128)  # minibatches (128: prediction's default), never all of X
    finally:
        backed.file.close()


def test_stream_backed_false_loads_once_and_trains_alike(small_adata, tmp_path):
    path = tmp_path / "small.h5ad"
    small_adata.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        z_loaded, _ = _train_latent(backed, stream_backed=False)
        z_memory, _ = _train_latent(small_adata.copy())
        np.testing.assert_array_equal(z_loaded, z_memory)
    finally:
        backed.file.close()


def test_reading_ahead_in_workers_changes_nothing(small_adata, tmp_path):
    """Streamed minibatches read by 2 worker processes give the same training as reading them in the main process;
    the file handle of a forked worker is its own."""
    path = tmp_path / "small.h5ad"
    small_adata.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        z_main, _ = _train_latent(backed)
        z_workers, model = _train_latent(backed, num_workers=2)
        np.testing.assert_array_equal(z_workers, z_main)
    finally:
        backed.file.close()


def test_a_forked_process_opens_its_own_handle(backed_file):
    import os

    backed, expected = backed_file
    matrix = BackedMatrix(backed.X)
    matrix.read_rows(np.array([0]))
    parent_handle = matrix._handle
    matrix._pid = os.getpid() + 1  # as a forked child sees it: opened by another process
    np.testing.assert_array_equal(_dense(matrix.read_rows(np.array([4, 2]))), expected[[4, 2]])
    assert matrix._handle is not parent_handle and matrix._pid == os.getpid()
    parent_handle.close()
    matrix.close()


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_a_bad_num_workers_is_refused(small_adata, bad):
    a = small_adata.copy()
    VMMSCVI.setup_anndata(a, batch_key="batch")
    model = VMMSCVI(a, seed=0, **TINY)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        model.train(max_epochs=1, seed=0, datasplitter_kwargs={"num_workers": bad}, **TRAIN)


def test_differential_expression_and_markers_work_on_a_backed_anndata(small_adata, tmp_path, monkeypatch):
    """scvi-tools' raw-count statistics fail on a backed matrix ('_CSRDataset' has no 'sum'); pyro-vmm's read the
    groups' rows from the file, with the same numbers, and never load X."""
    from scvi.model._utils import scrna_raw_counts_properties

    from pyro_vmm.scvi._expression import backed_raw_counts_properties

    path = tmp_path / "small.h5ad"
    small_adata.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")

    def refuse(*args, **kwargs):
        raise AssertionError("the backed matrix was loaded into memory")

    monkeypatch.setattr(type(backed.X), "to_memory", refuse)
    try:
        _, model = _train_latent(backed)
        memory = small_adata.copy()
        VMMSCVI.setup_anndata(memory, batch_key="batch")
        in_memory = VMMSCVI(memory, seed=0, **TINY).adata_manager
        idx1 = (backed.obs["batch"] == "CTRL").to_numpy()
        expected = scrna_raw_counts_properties(in_memory, idx1, ~idx1)
        got = backed_raw_counts_properties(model.adata_manager, idx1, ~idx1, chunk=50)
        assert list(got) == list(expected)
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, err_msg=key)

        de = model.differential_expression(groupby="batch", group1="CTRL", mode="change", silent=True)
        assert len(de) == backed.n_vars and np.isfinite(de["lfc_mean"]).all()
        np.testing.assert_allclose(de.loc[backed.var_names, "raw_mean1"], expected["raw_mean1"], rtol=1e-6)
        markers = model.cluster_markers(min_cells=5, silent=True, seed=0)
        assert {"cluster", "gene", "lfc_mean"} <= set(markers.columns)
    finally:
        backed.file.close()
