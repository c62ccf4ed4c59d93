"""Image data sets for clustering: MNIST and Fashion-MNIST (idx files), and scikit-learn's 8x8 digits.

Every loader returns an :class:`ImageData`: flattened images scaled to ``[-1, 1]`` (as in the paper,
``x -> 2 x / max - 1``), integer labels, and the image shape for plotting.

* :func:`load_digits` -- scikit-learn's embedded 8x8 digits (1,797 images, 10 classes); needs nothing.
* :func:`load_mnist`, :func:`load_fashion_mnist` -- the four idx files (``.gz`` or raw) from a folder, checked
  against the md5 of the *decompressed* bytes; when absent they are downloaded from the canonical source and cached
  (pass ``download=False`` to forbid that).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..utils import atomic_path

__all__ = [
    "DATASETS",
    "ImageData",
    "default_cache_dir",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dataset",
    "load_image_dataset",
    "load_mnist",
    "read_idx",
]

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: md5 of the decompressed idx files
MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

#: canonical sources of the gzipped idx files, tried in order
URLS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/"),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

DATASETS = ("digits", "mnist", "fashion_mnist")


@dataclass(frozen=True)
class ImageData:
    """Flattened images in ``[-1, 1]`` with their labels."""

    x: Tensor  #: (N, H*W) float32
    labels: Tensor  #: (N,) int64
    image_shape: tuple[int, int]  #: (H, W)
    name: str

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.labels.unique().numel())

    def subset(self, n: int | None, seed: int = 0) -> ImageData:
        """A uniformly random subset of ``n`` images (``None`` or ``n >= N``: everything), drawn with ``seed``."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"subset size must be >= 1, got {n}")
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return ImageData(self.x[idx], self.labels[idx], self.image_shape, self.name)


def _scale(images: np.ndarray, max_value: float) -> Tensor:
    """Pixels in [0, max_value] -> float32 in [-1, 1]."""
    return torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) * (2.0 / max_value) - 1.0)


def load_digits(subset: int | None = None, seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 handwritten digits (1,797 images, pixels 0-16), scaled to [-1, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits()
    data = ImageData(_scale(raw.images, 16.0), torch.as_tensor(raw.target, dtype=torch.long), (8, 8), "digits")
    return data.subset(subset, seed)


# ----------------------------------------------------------------------------------------------------------------
# idx files
# ----------------------------------------------------------------------------------------------------------------
def _find(folder: Path, name: str) -> Path | None:
    for path in (folder / f"{name}.gz", folder / name):
        if path.is_file():
            return path
    return None


def _read_bytes(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def read_idx(path: str | os.PathLike, md5: str | None = None) -> np.ndarray:
    """Parse an idx file (``.gz`` or raw) of unsigned bytes; check the md5 of the decompressed bytes if given."""
    path = Path(path)
    raw = _read_bytes(path)
    if md5 is not None:
        got = hashlib.md5(raw).hexdigest()
        if got != md5:
            raise ValueError(
                f"{path}: md5 of the decompressed file is {got}, expected {md5}; the file is corrupt or not the "
                "original data set -- delete it (it will be downloaded again) or replace it"
            )
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte idx files are supported (type code {raw[2]:#x})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {len(raw) - offset} values")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def default_cache_dir(name: str) -> Path:
    """``$PYRO_VMM_DATA/<name>``, else ``~/.cache/pyro_vmm/<name>``."""
    root = os.environ.get("PYRO_VMM_DATA")
    return Path(root) / name if root else Path.home() / ".cache" / "pyro_vmm" / name


def _download(name: str, folder: Path, file: str) -> Path:
    errors = []
    for base in URLS[name]:
        url = f"{base}{file}.gz"
        try:
            target = folder / f"{file}.gz"
            with urllib.request.urlopen(url, timeout=60) as response, atomic_path(target) as tmp:
                tmp.write_bytes(response.read())
            return target
        except (urllib.error.URLError, OSError) as err:
            errors.append(f"{url}: {err}")
    raise FileNotFoundError(
        f"{file} is not in {folder} and could not be downloaded ({'; '.join(errors)}). Offline? Copy the four idx "
        f"files of {name} (e.g. from ../shared/data/images/{name}) into that folder, or pass data_dir=FOLDER."
    )


def load_idx_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    subset: int | None = None,
    seed: int = 0,
    download: bool = True,
    verify: bool = True,
) -> ImageData:
    """MNIST or Fashion-MNIST from the idx files in ``data_dir`` (default :func:`default_cache_dir`).

    ``split``: ``'train'`` (60,000), ``'test'`` (10,000) or ``'all'`` (train then test, 70,000 -- the paper's
    evaluation set).  Missing files are downloaded and cached when ``download`` is true.
    """
    if name not in MD5:
        raise ValueError(f"unknown idx data set {name!r}; choose one of {sorted(MD5)}")
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    folder = Path(data_dir) if data_dir is not None else default_cache_dir(name)
    parts = ["train", "test"] if split == "all" else [split]
    xs, ys = [], []
    for part in parts:
        arrays = []
        for file in _FILES[part]:
            path = _find(folder, file)
            if path is None:
                if not download:
                    raise FileNotFoundError(
                        f"{file}(.gz) not found in {folder}; pass data_dir=FOLDER holding the {name} idx files "
                        "(e.g. ../shared/data/images/" + name + ") or allow download=True"
                    )
                folder.mkdir(parents=True, exist_ok=True)
                path = _download(name, folder, file)
            arrays.append(read_idx(path, MD5[name][file] if verify else None))
        images, labels = arrays
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels in the {part} split")
        xs.append(images)
        ys.append(labels)
    images, labels = np.concatenate(xs), np.concatenate(ys)
    data = ImageData(_scale(images, 255.0), torch.from_numpy(labels.astype(np.int64)), images.shape[1:], name)
    return data.subset(subset, seed)


def load_mnist(data_dir=None, split: str = "train", subset: int | None = None, seed: int = 0, **kwargs) -> ImageData:
    """MNIST (see :func:`load_idx_dataset`)."""
    return load_idx_dataset("mnist", data_dir, split, subset, seed, **kwargs)


def load_fashion_mnist(
    data_dir=None, split: str = "train", subset: int | None = None, seed: int = 0, **kwargs
) -> ImageData:
    """Fashion-MNIST (see :func:`load_idx_dataset`)."""
    return load_idx_dataset("fashion_mnist", data_dir, split, subset, seed, **kwargs)


def load_image_dataset(
    name: str, data_dir=None, split: str = "train", subset: int | None = None, seed: int = 0, **kwargs
) -> ImageData:
    """Dispatch on ``name`` in :data:`DATASETS`; ``kwargs`` (``download``, ``verify``) go to :func:`load_idx_dataset`
    (``digits`` ignores ``data_dir``, ``split`` and ``kwargs``)."""
    if name == "digits":
        return load_digits(subset, seed)
    if name in MD5:
        return load_idx_dataset(name, data_dir, split, subset, seed, **kwargs)
    raise ValueError(f"unknown data set {name!r}; choose one of {list(DATASETS)}")
