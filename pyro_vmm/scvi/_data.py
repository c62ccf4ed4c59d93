r"""Minibatches for the scvi-tools models of :mod:`pyro_vmm.scvi`: the split, the datasets and the sampler.

The registered count matrix (``REGISTRY_KEYS.X_KEY``) is held in memory as a dense tensor (CSR above
``max_dense_bytes``) or, for a backed AnnData, read from its file minibatch by minibatch
(:class:`~pyro_vmm.scvi._backed.BackedMatrix`).  The batch codes and the model's other registered fields (covariates,
size factors, ... : ``adata.obs``/``obsm`` columns, always in memory) ride along in every minibatch dict under their
registry keys.  The split is scvi-tools' ``DataSplitter``'s (permutation seeded by ``scvi.settings.seed``); each
epoch's training order is a pure function of ``(seed, epoch)`` (:class:`MinibatchSampler`), so a resumed run sees the
same minibatches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from scipy import sparse as sp
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.dataloaders import DataSplitter
from scvi.model._utils import parse_device_args
from torch.utils.data import DataLoader, Dataset, Sampler

from pyro_vmm.models.scvi import NONZERO_KEY

from ._backed import BackedMatrix, is_backed

__all__ = ["CountsDataset", "InMemoryDataSplitter", "MinibatchSampler", "registered_arrays", "registered_fields"]

#: above this many bytes a dense copy of the counts is not made; minibatches are densified from CSR instead
MAX_DENSE_BYTES = 2 * 1024**3


# ---------------------------------------------------------------------------------------------------------------
# Minibatching from memory, or streamed from a backed file (no per-step AnnData access)
# ---------------------------------------------------------------------------------------------------------------
def registered_arrays(adata_manager: AnnDataManager, indices: np.ndarray | None = None, stream: bool = False):
    """Registered counts and batch codes ``(N, 1)`` int64, optionally row-subset.

    Counts come back as a dense ndarray or CSR in memory.  A backed AnnData's CSR or dense ``X`` is read from its
    file: only the ``indices`` rows when given, or not at all with ``stream=True`` (a :class:`BackedMatrix` is
    returned, to read minibatches from; ``indices`` then apply to the batch codes only)."""
    counts = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    batch = np.asarray(adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)).reshape(-1, 1).astype(np.int64)
    if is_backed(counts):
        matrix = BackedMatrix(counts)
        if stream:
            return matrix, (batch if indices is None else batch[indices])
        if indices is not None:
            return matrix.read_rows(indices), batch[indices]
    if hasattr(counts, "to_memory"):  # backed CSC / lazy arrays
        counts = counts.to_memory()
    if sp.issparse(counts):
        counts = sp.csr_matrix(counts)
    elif not isinstance(counts, np.ndarray):
        counts = np.asarray(counts[:])
    if indices is not None:
        counts, batch = counts[indices], batch[indices]
    return counts, batch


#: registry keys that are never minibatch fields: the counts and batch have their own slots, labels are not modelled
_OWN_SLOTS = (REGISTRY_KEYS.X_KEY, REGISTRY_KEYS.BATCH_KEY, REGISTRY_KEYS.LABELS_KEY)


def _is_categorical(adata_manager: AnnDataManager, key: str) -> bool:
    """A categorical field (integer codes): its state registry holds category mappings."""
    state = adata_manager.registry["field_registries"].get(key, {}).get("state_registry", {})
    return "categorical_mapping" in state or "mappings" in state


def registered_fields(
    adata_manager: AnnDataManager, indices: np.ndarray | None = None, keys: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """The registered fields ``keys`` that are present (default: every one but the counts, batch and labels), as
    ``{registry key: (N, .) array}``: categorical codes int64, everything else float32 (covariates, size factors,
    an ``obsm`` matrix), optionally row-subset (they live in ``adata.obs``/``obsm``, in memory also for a backed
    AnnData)."""
    registered = adata_manager.data_registry
    if keys is None:
        keys = [k for k in registered if k not in _OWN_SLOTS]
    out = {}
    for key in keys:
        if key not in registered:
            continue
        values = adata_manager.get_from_registry(key)
        values = np.asarray(values.to_numpy() if hasattr(values, "to_numpy") else values)
        values = values.reshape(values.shape[0], -1)
        values = values.astype(np.int64 if _is_categorical(adata_manager, key) else np.float32)
        out[key] = values if indices is None else values[indices]
    return out


class CountsDataset(Dataset):
    """Counts and batch codes indexed by a tensor of row positions; returns scvi-tools' minibatch dict.

    Counts are a dense float32 tensor (optionally already on the training device) unless that would exceed
    ``max_dense_bytes``; then a CSR matrix is kept and each minibatch is densified on the fly.  ``counts`` may also be
    a :class:`~pyro_vmm.scvi._backed.BackedMatrix` (an on-disk AnnData matrix) with ``rows``, the file rows of this
    dataset's cells: each minibatch is then read from the file (streamed), and nothing else is held in memory.
    ``covariates``: the model's other registered fields of the same cells (:func:`registered_fields`), added to every
    minibatch under their registry keys."""

    def __init__(
        self,
        counts,
        batch: np.ndarray,
        device: torch.device | str = "cpu",
        max_dense_bytes: int = MAX_DENSE_BYTES,
        rows: np.ndarray | None = None,
        covariates: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.streamed = isinstance(counts, BackedMatrix)
        if self.streamed:
            n, g = len(batch), counts.shape[1]
            self.rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
            if len(self.rows) != n:
                raise ValueError(f"{len(self.rows)} rows for {n} batch codes")
        else:
            n, g = counts.shape
        self.dense = not self.streamed and n * g * 4 <= max_dense_bytes
        if self.dense:
            array = counts.toarray() if sp.issparse(counts) else counts
            self.counts = torch.as_tensor(np.asarray(array, dtype=np.float32), device=self.device)
            self.indptr, self.indices = _row_nonzero_index(self.counts)
        elif self.streamed:
            self.counts = counts
        else:
            self.counts = sp.csr_matrix(counts, dtype=np.float32)
        self.batch = torch.as_tensor(batch, dtype=torch.long, device=self.device if self.dense else "cpu")
        self.covariates = {
            key: torch.as_tensor(values, device=self.batch.device) for key, values in (covariates or {}).items()
        }
        for key, values in self.covariates.items():
            if values.shape[0] != len(self.batch):
                raise ValueError(f"{values.shape[0]} rows of {key!r} for {len(self.batch)} cells")

    def __len__(self) -> int:
        return int(self.batch.shape[0])

    def __getitem__(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.dense:
            idx = idx.to(self.device)
            return {
                REGISTRY_KEYS.X_KEY: self.counts[idx],
                REGISTRY_KEYS.BATCH_KEY: self.batch[idx],
                NONZERO_KEY: _gather_rows_nonzero(self.indptr, self.indices, idx),
                **{key: values[idx] for key, values in self.covariates.items()},
            }
        rows = idx.cpu().numpy()
        block = self.counts.read_rows(self.rows[rows]) if self.streamed else self.counts[rows]
        x = block.toarray() if sp.issparse(block) else np.asarray(block)
        return {  # no "nonzero" key: the likelihood finds the non-zero counts of the densified block itself
            REGISTRY_KEYS.X_KEY: torch.from_numpy(np.asarray(x, dtype=np.float32)),
            REGISTRY_KEYS.BATCH_KEY: self.batch[idx.cpu()],
            **{key: values[idx.cpu()] for key, values in self.covariates.items()},
        }


def _row_nonzero_index(counts: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR structure ``(indptr (N+1,), indices (nnz,) int32)`` of a dense ``(N, G)`` count tensor, built in row chunks
    (no ``(nnz, 2)`` int64 index of the whole matrix at once)."""
    counts_per_row, cols = [], []
    for start in range(0, counts.shape[0], chunk):
        block = counts[start : start + chunk]
        rows, c = torch.nonzero(block, as_tuple=True)
        counts_per_row.append(torch.bincount(rows, minlength=block.shape[0]))
        cols.append(c.to(torch.int32))
    lengths = torch.cat(counts_per_row) if counts_per_row else counts.new_zeros(0, dtype=torch.long)
    indptr = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    indices = torch.cat(cols) if cols else counts.new_zeros(0, dtype=torch.int32)
    return indptr, indices


def _gather_rows_nonzero(indptr: torch.Tensor, indices: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``(2, nnz)`` positions of the non-zero entries of ``counts[idx]`` from the CSR structure of ``counts``, in
    row-major order: what ``torch.stack(torch.nonzero(counts[idx], as_tuple=True))`` gives, at a fraction of its
    cost (no pass over the dense minibatch)."""
    starts = indptr[idx]
    lengths = indptr[idx + 1] - starts
    total = int(lengths.sum())
    rows = torch.repeat_interleave(torch.arange(len(idx), device=idx.device), lengths, output_size=total)
    shift = torch.repeat_interleave(starts - (lengths.cumsum(0) - lengths), lengths, output_size=total)
    cols = indices[torch.arange(total, device=idx.device).add_(shift)].long()
    return torch.stack([rows, cols])


class MinibatchSampler(Sampler):
    """Yields index tensors of ``batch_size`` rows, in a new random order each epoch when ``shuffle``.

    With ``seed``, epoch ``e``'s order is ``torch.randperm(n)`` under a generator seeded with
    ``seed * 1_000_003 + e`` (Lightning calls :meth:`set_epoch` before each epoch): a pure function of
    ``(seed, e)``, so a run resumed from a checkpoint sees the same minibatches as an uninterrupted one, and the
    global RNG is not touched.  Without ``seed`` the order is drawn from the global torch RNG.
    A trailing minibatch of a single cell is dropped while training (BatchNorm cannot normalise one cell).
    With ``block_size`` b > 1 the permutation shuffles blocks of b consecutive positions (cells that sit next to each
    other in the file travel together; a minibatch of B cells is then about B / b contiguous runs, a few reads from
    disk instead of B); b = 1 is the plain per-cell permutation.
    Under data-parallel training (``torch.distributed`` initialised, e.g. Lightning DDP) rank ``r`` of ``W`` takes
    every ``W``-th cell of the shared permutation, so ranks see disjoint minibatches and run equally many steps."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        drop_singleton: bool = False,
        seed: int | None = None,
        block_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}; e.g. block_size=16")
        self.n, self.batch_size, self.shuffle, self.drop_singleton = int(n), int(batch_size), shuffle, drop_singleton
        self.block_size = int(block_size)
        self.seed = None if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        gen = None
        if self.seed is not None:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63 - 1))
        b = self.block_size
        if b == 1:
            return torch.randperm(self.n, generator=gen)
        blocks = torch.randperm(-(-self.n // b), generator=gen)
        order = (blocks[:, None] * b + torch.arange(b)).reshape(-1)
        return order[order < self.n]

    @staticmethod
    def _replica() -> tuple[int, int]:
        """``(rank, world_size)`` of the running data-parallel job; ``(0, 1)`` outside one."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self._order()
        rank, world = self._replica()
        if world > 1:
            # every rank draws the same permutation (same seed) and takes a disjoint, equally long share of it;
            # the last ``n mod world`` cells of the permutation sit this epoch out, so all ranks run the same
            # number of steps (their collectives must pair up)
            order = order[: len(order) - len(order) % world][rank::world]
        n = len(order)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.drop_singleton and len(idx) == 1 and n > 1:
                continue
            yield idx

    def __len__(self) -> int:
        _, world = self._replica()
        n = self.n // world if world > 1 else self.n
        full, rest = divmod(n, self.batch_size)
        return full + int(rest > 0 and not (self.drop_singleton and rest == 1 and n > 1))


def _loader(
    dataset: CountsDataset,
    batch_size: int,
    shuffle: bool,
    drop_singleton: bool,
    seed: int | None = None,
    block_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    sampler = MinibatchSampler(
        len(dataset), batch_size, shuffle=shuffle, drop_singleton=drop_singleton, seed=seed, block_size=block_size
    )
    # a private generator: otherwise each iter(loader) draws a worker base seed from the global torch RNG, which
    # would make the random stream depend on when loaders are iterated (and break exact resume)
    workers = {"num_workers": num_workers, "persistent_workers": True} if num_workers else {}
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        generator=torch.Generator().manual_seed(0),
        pin_memory=pin_memory,
        **workers,
    )


class InMemoryDataSplitter(DataSplitter):
    """scvi-tools' train/validation/test split, with minibatches sliced from tensors held in memory.

    The split is exactly ``DataSplitter``'s (same sizes, same ``scvi.settings.seed`` permutation).  With a CUDA
    accelerator the dense counts are copied to the device once (like ``DeviceBackedDataSplitter``).
    ``shuffle_seed`` makes each epoch's training order a function of ``(shuffle_seed, epoch)``
    (:class:`MinibatchSampler`).

    A backed AnnData (``anndata.read_h5ad(path, backed="r")``, CSR or dense ``X``) is streamed: minibatches are read
    from the file as training asks for them, and the matrix is never loaded (``stream_backed=False`` loads it once
    instead: faster, needs the memory).  ``block_size`` sets :class:`MinibatchSampler`'s shuffling of the training
    cells in blocks of consecutive cells; ``None`` means 1 (per-cell shuffling) in memory and 16 when streaming,
    where it makes a minibatch a few reads from disk instead of one per cell.  ``num_workers`` > 0 reads streamed
    minibatches ahead in that many worker processes (their order and content are unchanged; pinned memory on CUDA);
    it does nothing for data held in memory, which needs no reading.  ``fields``: the registry keys put in every
    minibatch besides the counts and batch (default: every registered one but the labels; see
    :func:`registered_fields`)."""

    #: block size of the training shuffle when streaming from disk and ``block_size`` is not given
    STREAM_BLOCK_SIZE = 16

    def __init__(
        self,
        adata_manager: AnnDataManager,
        train_size: float | None = 0.9,
        validation_size: float | None = None,
        batch_size: int = 128,
        shuffle_set_split: bool = True,
        accelerator: str = "auto",
        device: int | str = "auto",
        max_dense_bytes: int = MAX_DENSE_BYTES,
        shuffle_seed: int | None = None,
        stream_backed: bool = True,
        block_size: int | None = None,
        num_workers: int = 0,
        fields: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            adata_manager,
            train_size=train_size,
            validation_size=validation_size,
            shuffle_set_split=shuffle_set_split,
            batch_size=batch_size,
            **kwargs,
        )
        self.batch_size = int(batch_size)
        self.max_dense_bytes = max_dense_bytes
        self.shuffle_seed = shuffle_seed
        self.stream_backed = bool(stream_backed)
        self.block_size = block_size
        if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}; e.g. num_workers=2")
        self.num_workers = int(num_workers)
        self.fields = None if fields is None else tuple(fields)
        _, _, self.device = parse_device_args(accelerator=accelerator, devices=device, return_device="torch")
        self._sets: dict[str, CountsDataset | None] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._sets is not None:
            return
        super().setup(stage)
        counts, batch = registered_arrays(self.adata_manager, stream=self.stream_backed)
        covs = registered_fields(self.adata_manager, keys=self.fields)
        device = self.device if self.device.type != "cpu" else "cpu"
        self.streamed = isinstance(counts, BackedMatrix)
        if self.block_size is None:
            self.block_size = self.STREAM_BLOCK_SIZE if self.streamed else 1

        def subset(idx: np.ndarray) -> CountsDataset | None:
            if len(idx) == 0:
                return None
            idx = np.sort(idx)
            sub = {key: values[idx] for key, values in covs.items()}
            if self.streamed:
                return CountsDataset(counts, batch[idx], rows=idx, covariates=sub)
            return CountsDataset(counts[idx], batch[idx], device, self.max_dense_bytes, covariates=sub)

        self._sets = {"train": subset(self.train_idx), "val": subset(self.val_idx), "test": subset(self.test_idx)}

    def _reading(self) -> dict:
        """Worker and pinning arguments of the loaders: only streamed data is read ahead."""
        if not self.streamed:
            return {}
        return {"num_workers": self.num_workers, "pin_memory": self.device.type == "cuda"}

    def train_dataloader(self) -> DataLoader:
        return _loader(
            self._sets["train"],
            self.batch_size,
            shuffle=True,
            drop_singleton=True,
            seed=self.shuffle_seed,
            block_size=self.block_size,
            **self._reading(),
        )

    def val_dataloader(self) -> DataLoader | None:
        ds = self._sets["val"]
        if ds is None:
            return None
        return _loader(ds, self.batch_size, shuffle=False, drop_singleton=False, **self._reading())

    def test_dataloader(self) -> DataLoader | None:
        ds = self._sets["test"]
        if ds is None:
            return None
        return _loader(ds, self.batch_size, shuffle=False, drop_singleton=False, **self._reading())
