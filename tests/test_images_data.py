"""Image loaders: the real idx files (md5, shapes, scaling), idx parsing, subsets and clear errors."""

from __future__ import annotations

import gzip
import hashlib
import shutil

import numpy as np
import pytest
import torch

from pyro_vmm.data.images import (
    MD5,
    ImageData,
    load_digits,
    load_fashion_mnist,
    load_image_dataset,
    load_mnist,
    read_idx,
)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_idx_files(name, shared_data):
    folder = shared_data / "images" / name
    train = load_image_dataset(name, folder, split="train", download=False)
    test = load_image_dataset(name, folder, split="test", download=False)
    assert train.x.shape == (60000, 784) and train.labels.shape == (60000,)
    assert test.x.shape == (10000, 784) and test.image_shape == (28, 28)
    assert train.x.dtype == torch.float32 and train.labels.dtype == torch.long
    assert float(train.x.min()) == -1.0 and float(train.x.max()) == 1.0
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    np.testing.assert_array_equal(torch.bincount(test.labels).numpy() >= 892, True)  # all classes present
    # the scaling is x -> 2 x / 255 - 1 of the raw bytes
    raw = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    torch.testing.assert_close(test.x[0], torch.from_numpy(raw[0].reshape(-1) / 127.5 - 1.0).float())


def test_md5_of_the_decompressed_files(shared_data):
    for name in ("mnist", "fashion_mnist"):
        for file, md5 in MD5[name].items():
            data = gzip.decompress((shared_data / "images" / name / f"{file}.gz").read_bytes())
            assert hashlib.md5(data).hexdigest() == md5


def test_all_split_and_subset(shared_data):
    folder = shared_data / "images" / "mnist"
    both = load_mnist(folder, split="all", download=False)
    assert len(both) == 70000
    sub = load_mnist(folder, split="all", subset=500, seed=3, download=False)
    again, other = both.subset(500, seed=3), both.subset(500, seed=4)
    assert len(sub) == 500 and torch.equal(sub.x, again.x) and not torch.equal(sub.x, other.x)
    # a subset is made of rows of the full set, with their own labels
    for i in range(5):
        hits = (both.x == sub.x[i]).all(-1).nonzero().flatten()
        assert hits.numel() >= 1 and sub.labels[i] in both.labels[hits]


def test_corrupt_file_is_rejected(tmp_path, shared_data):
    src = shared_data / "images" / "fashion_mnist"
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    raw = bytearray(gzip.decompress((src / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes(raw))  # uncompressed files are read too
    with pytest.raises(ValueError, match="md5"):
        load_fashion_mnist(tmp_path, split="test", download=False)
    data = load_idx_dataset_unverified(tmp_path)
    assert data.labels.shape == (10000,)


def load_idx_dataset_unverified(folder) -> ImageData:
    from pyro_vmm.data.images import load_idx_dataset

    return load_idx_dataset("fashion_mnist", folder, split="test", download=False, verify=False)


def test_missing_files_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_mnist(tmp_path, download=False)
    with pytest.raises(ValueError, match="unknown data set"):
        load_image_dataset("cifar10")
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, split="val", download=False)


def test_read_idx_hand_made(tmp_path):
    values = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(int(s).to_bytes(4, "big") for s in values.shape)
    path = tmp_path / "toy-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + values.tobytes()))
    np.testing.assert_array_equal(read_idx(path), values)
    (tmp_path / "bad").write_bytes(header + values.tobytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "bad")
    (tmp_path / "notidx").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "notidx")


def test_digits_default_needs_nothing():
    d = load_digits()
    assert d.x.shape == (1797, 64) and d.image_shape == (8, 8) and d.n_classes == 10
    assert float(d.x.min()) == -1.0 and float(d.x.max()) == 1.0
    s = load_image_dataset("digits", subset=100, seed=1)
    assert len(s) == 100 and s.name == "digits"
    assert load_digits(subset=5000) is not None and len(load_digits(subset=5000)) == 1797
