r"""``VMMSCVI``: scVI with a VampPrior Mixture prior, driven like ``scvi.model.SCVI``.

>>> VMMSCVI.setup_anndata(adata, batch_key="batch")
>>> model = VMMSCVI(adata, prior="vmm", n_clusters=100)
>>> model.train(seed=0)
>>> adata.obsm["X_vmm"] = model.get_latent_representation()         # E_q[z | x]
>>> adata.obs["vmm_cluster"] = model.get_cluster_assignments()      # argmax_k q(c = k | E_q[z | x])
>>> markers = model.cluster_markers()                               # marker genes of every cluster (DE)

The Pyro program is :class:`pyro_vmm.models.scvi.VMMSCVIModule`; training alternates one VI step and one EM step per
minibatch (:class:`pyro_vmm.training_plan.VMMTrainingPlan`).  Minibatches are sliced from the registered count matrix
held in memory as a tensor (:class:`InMemoryDataSplitter`), or read from the file of a backed AnnData (streamed, see
:mod:`pyro_vmm.backed`), with the same train/validation split as scvi-tools' ``DataSplitter`` (permutation seeded by
``scvi.settings.seed``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch
from scipy import sparse as sp
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from scvi.data.fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    LayerField,
    NumericalJointObsField,
    NumericalObsField,
)
from scvi.dataloaders import DataSplitter
from scvi.model._utils import parse_device_args
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from torch.utils.data import DataLoader, Dataset, Sampler

from pyro_vmm.models.scvi import COVARIATE_KEYS, NONZERO_KEY, VMMSCVIModule, covariate_kwargs

from .backed import BackedMatrix, is_backed
from .checkpoint import load_checkpoint
from .expression import ExpressionMixin
from .infer import AlternatingSVI
from .quiet import quiet_lightning
from .training_plan import VMMTrainingPlan
from .defaults import DEFAULTS, final_components, min_cluster_size, training_epochs
from .utils import set_seed

__all__ = ["InMemoryDataSplitter", "VMMSCVI"]

logger = logging.getLogger(__name__)

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


def registered_covariates(adata_manager: AnnDataManager, indices: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The registered covariates that are present, as ``{registry key: (N, .) array}``: categorical codes (int64),
    continuous covariates and size factors (float32), optionally row-subset (they live in ``adata.obs``, in memory
    also for a backed AnnData)."""
    out = {}
    fields = adata_manager.data_registry
    for key in COVARIATE_KEYS:
        if key not in fields:
            continue
        values = adata_manager.get_from_registry(key)
        values = np.asarray(values.to_numpy() if hasattr(values, "to_numpy") else values)
        values = values.reshape(values.shape[0], -1)
        values = values.astype(np.int64 if key == REGISTRY_KEYS.CAT_COVS_KEY else np.float32)
        out[key] = values if indices is None else values[indices]
    return out


def covariate_query_args(registry: dict) -> dict:
    """The covariate arguments of :func:`pyro_vmm.validation.validate_query` for a model's registry: the size-factor
    and continuous keys, and each categorical covariate's categories."""
    args = registry["setup_args"]
    cat_state = registry["field_registries"].get(REGISTRY_KEYS.CAT_COVS_KEY, {}).get("state_registry", {})
    return {
        "size_factor_key": args.get("size_factor_key"),
        "categorical_covariates": {k: list(v) for k, v in cat_state.get("mappings", {}).items()},
        "continuous_covariate_keys": list(args.get("continuous_covariate_keys") or []),
    }


class CountsDataset(Dataset):
    """Counts and batch codes indexed by a tensor of row positions; returns scvi-tools' minibatch dict.

    Counts are a dense float32 tensor (optionally already on the training device) unless that would exceed
    ``max_dense_bytes``; then a CSR matrix is kept and each minibatch is densified on the fly.  ``counts`` may also be
    a :class:`~pyro_vmm.backed.BackedMatrix` (an on-disk AnnData matrix) with ``rows``, the file rows of this
    dataset's cells: each minibatch is then read from the file (streamed), and nothing else is held in memory.
    ``covariates``: the registered covariates of the same cells (:func:`registered_covariates`), added to every
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
    it does nothing for data held in memory, which needs no reading."""

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
        _, _, self.device = parse_device_args(accelerator=accelerator, devices=device, return_device="torch")
        self._sets: dict[str, CountsDataset | None] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._sets is not None:
            return
        super().setup(stage)
        counts, batch = registered_arrays(self.adata_manager, stream=self.stream_backed)
        covs = registered_covariates(self.adata_manager)
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


def _data_parallel(trainer_kwargs: dict) -> bool:
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer_kwargs.get("strategy")
    return isinstance(strategy, DDPStrategy) or (isinstance(strategy, str) and strategy.startswith("ddp"))


def _ddp_strategy(strategy):
    """Lightning's DDP strategy for the alternating step.

    One training step runs two backward passes (VI, then EM) and each touches only part of the parameters (the EM
    loss never reaches the decoder), so DDP must look for unused parameters; gradients are then averaged over
    ranks in both passes and every rank applies the same Adam updates."""
    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(strategy, DDPStrategy):
        return strategy
    start_method = "spawn" if "spawn" in strategy else "popen"
    return DDPStrategy(find_unused_parameters=True, start_method=start_method)


def _load_training_checkpoint(path: Path, kind: str) -> dict:
    """Read a training checkpoint, adding to a read error what :meth:`VMMSCVI.train` can do about it."""
    from .validation import InputError

    try:
        return load_checkpoint(path, kind=kind)
    except InputError as err:
        raise InputError(
            f"cannot resume from the newest checkpoint in {str(path.parent)!r}: {err} To resume from the previous "
            f"checkpoint in that folder, delete {path.name}; to start over, pass another (empty) checkpoint_dir."
        ) from err


# ---------------------------------------------------------------------------------------------------------------
# The model class
# ---------------------------------------------------------------------------------------------------------------
class VMMSCVI(ExpressionMixin, BaseModelClass):
    """scVI whose latent prior is the VampPrior Mixture (or ``normal``, ``vampprior``, ``gmm``), in Pyro.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (raw counts).
    prior
        ``"vmm"`` (default), ``"gmm"``, ``"vampprior"`` or ``"normal"``.
    n_clusters
        ``K``, the maximum number of clusters (mixture components / pseudo-inputs).
    n_latent, n_hidden, n_layers, dropout_rate, gene_likelihood
        As in ``scvi.model.SCVI`` (encoder dropout only; ``"zinb"`` or ``"nb"``).
    inference
        ``"map-dp"`` (the paper), ``"map"`` or ``"mle"`` for the mixture priors.
    seed
        Seeds the network initialisation and the choice of the ``K`` pseudo-input cells (global RNGs untouched).
    encode_covariates
        Give the batch to the encoder as well as the decoder (default ``False``, as ``scvi.model.SCVI``; see
        :mod:`pyro_vmm.defaults`).
    **module_kwargs
        Passed to :class:`~pyro_vmm.models.scvi.VMMSCVIModule` (``var_activation``, ``pseudo_input_shift``).
    """

    _module_cls = VMMSCVIModule
    _training_plan_cls = VMMTrainingPlan
    _data_splitter_cls = InMemoryDataSplitter
    _train_runner_cls = TrainRunner

    def __init__(
        self,
        adata,
        prior: str = "vmm",
        n_clusters: int = 100,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        gene_likelihood: str = "zinb",
        dropout_rate: float = 0.1,
        inference: str = "map-dp",
        seed: int | None = None,
        encode_covariates: bool = DEFAULTS.encode_covariates,
        **module_kwargs,
    ) -> None:
        pyro.clear_param_store()  # nothing of ours lives there; clears leftovers of other Pyro models
        super().__init__(adata)
        if int(n_clusters) < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        n_cells, n_genes = self.summary_stats.n_cells, self.summary_stats.n_vars
        n_batch = self.summary_stats.n_batch
        rng = np.random.default_rng(seed if seed is not None else np.random.randint(2**31))
        pseudo_counts = None
        covs = registered_covariates(self.adata_manager)
        cat_state = self.adata_manager.registry["field_registries"].get(REGISTRY_KEYS.CAT_COVS_KEY, {})
        n_cats_per_cov = list(cat_state.get("state_registry", {}).get("n_cats_per_key", []))
        cont = covs.get(REGISTRY_KEYS.CONT_COVS_KEY)
        covariate_sizes = {}
        if n_cats_per_cov:
            covariate_sizes["n_cats_per_cov"] = n_cats_per_cov
        if cont is not None:  # the pseudo-inputs' continuous part: the cells' mean
            covariate_sizes["n_continuous_cov"] = cont.shape[1]
            covariate_sizes["cont_covs_mean"] = torch.as_tensor(cont.mean(axis=0, dtype=np.float64))
        if prior.lower() in ("vmm", "vampprior"):
            rows = np.sort(rng.choice(n_cells, size=n_clusters, replace=n_clusters > n_cells))
            counts, _ = registered_arrays(self.adata_manager, rows)
            pseudo_counts = torch.as_tensor(np.asarray(counts.todense() if sp.issparse(counts) else counts))
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.module = self._module_cls(
                n_input=n_genes,
                n_batch=n_batch,
                n_latent=n_latent,
                n_hidden=n_hidden,
                n_layers=n_layers,
                dropout_rate=dropout_rate,
                gene_likelihood=gene_likelihood,
                prior=prior,
                n_clusters=n_clusters,
                pseudo_inputs=pseudo_counts,
                inference=inference,
                encode_covariates=encode_covariates,
                **covariate_sizes,
                **module_kwargs,
            )
        self._model_summary_string = (
            f"VMMSCVI model: prior={prior}, n_clusters={self.module.prior.n_components}, n_latent={n_latent}, "
            f"n_hidden={n_hidden}, n_layers={n_layers}, gene_likelihood={gene_likelihood}, "
            f"dropout_rate={dropout_rate}, inference={inference}"
        )
        self.init_params_ = self._get_init_params(locals())

    # -------------------------------------------------------------------------------------------- data setup
    @classmethod
    def setup_anndata(
        cls,
        adata,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        **kwargs,
    ) -> None:
        r"""Register raw counts (``adata.X`` or ``adata.layers[layer]``), the batch, (optionally) the labels, and the
        covariates, with ``scvi.model.SCVI.setup_anndata``'s semantics: ``size_factor_key``, an ``adata.obs`` column
        of positive size factors used as the library size :math:`\ell_n` instead of the cell's total count;
        ``categorical_covariate_keys`` (one-hot) and ``continuous_covariate_keys`` (as they are), ``adata.obs``
        columns given to the decoder (and to the encoder with ``encode_covariates=True``)."""
        setup_method_args = cls._get_setup_method_args(**locals())  # first: only the arguments are locals here
        from pyro_vmm.validation import validate_anndata

        validate_anndata(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            NumericalObsField(REGISTRY_KEYS.SIZE_FACTOR_KEY, size_factor_key, required=False),
            CategoricalJointObsField(REGISTRY_KEYS.CAT_COVS_KEY, categorical_covariate_keys),
            NumericalJointObsField(REGISTRY_KEYS.CONT_COVS_KEY, continuous_covariate_keys),
        ]
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # -------------------------------------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = DEFAULTS.batch_size,
        lr: float = DEFAULTS.lr,
        prior_lr_ratio: float = DEFAULTS.prior_lr_ratio,
        train_size: float = 0.9,
        validation_size: float | None = None,
        early_stopping: bool = DEFAULTS.early_stopping,
        early_stopping_patience: int = DEFAULTS.early_stopping_patience,
        n_epochs_kl_warmup: int | None | str = "auto",
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        seed: int | None = None,
        enable_progress_bar: bool = True,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        nan_guard: bool = True,
        max_nan_retries: int = 5,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        resume: bool = True,
        **trainer_kwargs,
    ):
        """Fit by alternating one VI step and one EM step per minibatch (see :mod:`pyro_vmm.training_plan`).

        Reliability: with ``nan_guard`` a step whose losses or parameters go non-finite is rolled back, both learning
        rates are halved and a warning is logged; ``max_nan_retries`` failures in a row raise
        :class:`~pyro_vmm.guard.NonFiniteError`.  With ``checkpoint_dir`` the full training state is written there
        atomically every ``checkpoint_every`` epochs (the 2 newest are kept), and a later call with the same
        arguments and ``resume=True`` continues from the newest one, ending with the same parameters as an
        uninterrupted run (CPU; see :mod:`pyro_vmm.resume`)::

            model.train(max_epochs=400, seed=0, checkpoint_dir="run1/ckpt")   # killed after some epochs ...
            model = VMMSCVI(adata, seed=0)                                    # ... later, in a new process:
            model.train(max_epochs=400, seed=0, checkpoint_dir="run1/ckpt")   # continues from the last epoch

        Parameters
        ----------
        All defaults are the recipe of :mod:`pyro_vmm.defaults` (the same as ``pyro-vmm scrna``'s).

        max_epochs
            Default: scvi-tools' heuristic (400 epochs up to 20k cells, fewer above), as ``SCVI.train()``.
        batch_size
            Minibatch size ``B``; it also sets the hyperprior strength of the EM step (divided by ``B``).
        lr, prior_lr_ratio
            VI Adam learning rate; EM learning rate is ``lr * prior_lr_ratio``.
        train_size, validation_size
            Split as scvi-tools' ``DataSplitter`` (permutation seeded by ``scvi.settings.seed``).
        early_stopping, early_stopping_patience
            Stop when ``elbo_validation`` has not improved for this many epochs (the paper used 100; off by
            default, as in ``SCVI.train()``).
        n_epochs_kl_warmup
            Epochs of linear KL warm-up (``"auto"``: all of ``max_epochs``, as ``SCVI`` at its defaults; ``None``:
            none, the paper's loss throughout).
        seed
            Seeds Python, NumPy, torch, Pyro and ``scvi.settings.seed`` (the split) so a CPU run is repeatable.
        plan_kwargs
            Extra :class:`~pyro_vmm.training_plan.VMMTrainingPlan` arguments (``adam_eps``,
            ``attach_responsibilities``, ``track_utilized_clusters``, ``fused_adam``, ``validate_distributions``).
        datasplitter_kwargs
            Extra :class:`InMemoryDataSplitter` arguments: ``stream_backed`` (default ``True``: a backed AnnData is
            read from its file minibatch by minibatch; ``False`` loads it), ``block_size`` (shuffle training cells
            in blocks of consecutive cells; default 1 in memory, 16 when streaming), ``num_workers`` (processes
            reading streamed minibatches ahead; default 0), ``max_dense_bytes``.
        nan_guard, max_nan_retries
            Non-finite step guard (``plan_kwargs`` take ``nan_lr_factor`` and ``guard_every`` for a cheaper guard).
        checkpoint_dir, checkpoint_every, resume
            Folder for checkpoints, their interval in epochs, and whether to continue from the newest one there
            (``resume=False`` refuses a folder that already holds checkpoints rather than overwrite them).
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (Lightning ``Trainer`` arguments).  Data-parallel training:
            ``devices=N, strategy="ddp"`` (needs ``seed``; each process takes every N-th cell of the epoch's
            permutation, gradients of both steps are averaged over processes; scvi-tools turns early stopping off
            under DDP).  ``B`` is then the per-process minibatch and the hyperpriors stay scaled by ``1/B``.
        """
        from .resume import (
            CHECKPOINT_KIND,
            AtomicCheckpointIO,
            EpochCheckpointer,
            check_resume_payload,
            find_resume_checkpoint,
            run_fingerprint,
        )

        if max_epochs is not None:  # 0 would return at once and mark the model trained
            from .validation import validate_positive_int

            max_epochs = validate_positive_int("max_epochs", max_epochs)
        data_parallel = _data_parallel(trainer_kwargs)
        if data_parallel and seed is None:
            raise ValueError(
                "data-parallel training needs seed=...: every process must draw the same split and the same "
                "minibatch permutation (each then takes its own share)"
            )
        if seed is not None:
            settings.seed = seed
            set_seed(seed)
        if max_epochs is None:
            max_epochs = training_epochs(self.adata.n_obs)
        if n_epochs_kl_warmup == "auto":
            n_epochs_kl_warmup = max_epochs
        resume_path = payload = None
        if checkpoint_dir is not None:
            resume_path = find_resume_checkpoint(checkpoint_dir, resume)
            if resume_path is not None:
                payload = _load_training_checkpoint(resume_path, CHECKPOINT_KIND)
        if seed is not None:
            shuffle_seed = int(seed)
        elif payload is not None and isinstance(payload.get("pyro_vmm"), dict):
            shuffle_seed = payload["pyro_vmm"].get("shuffle_seed")
        else:
            shuffle_seed = int(torch.randint(2**31 - 1, (1,)))
        splitter = self._data_splitter_cls(
            self.adata_manager,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            accelerator=accelerator,
            device=devices,
            **{"shuffle_seed": shuffle_seed, **(datasplitter_kwargs or {})},
        )
        if early_stopping and splitter.n_val == 0:
            raise ValueError(
                "early_stopping monitors elbo_validation but the split has no validation cells; "
                "set train_size < 1 (e.g. 0.9) or early_stopping=False"
            )
        plan_kwargs = {
            "nan_guard": nan_guard,
            "max_nan_retries": max_nan_retries,
            "n_epochs_kl_warmup": n_epochs_kl_warmup,
            **(plan_kwargs or {}),
        }
        plan = self._training_plan_cls(self.module, lr=lr, prior_lr_ratio=prior_lr_ratio, **plan_kwargs)
        if checkpoint_dir is not None:
            splitter.setup()
            fingerprint = run_fingerprint(self.adata, self.adata_manager, splitter, seed=seed, batch_size=batch_size)
            if payload is not None:
                check_resume_payload(resume_path, payload, fingerprint, self.module.state_dict())
                logger.info("resuming from %s (epoch %s)", resume_path, payload.get("epoch"))
            plan.checkpointer = EpochCheckpointer(
                checkpoint_dir, every=checkpoint_every, extra={**fingerprint, "shuffle_seed": shuffle_seed}
            )
            trainer_kwargs["plugins"] = [*list(trainer_kwargs.get("plugins") or []), AtomicCheckpointIO()]
            if resume_path is not None:
                trainer_kwargs["ckpt_path"] = str(resume_path)
        if data_parallel:
            trainer_kwargs["strategy"] = _ddp_strategy(trainer_kwargs["strategy"])
            trainer_kwargs["use_distributed_sampler"] = False  # MinibatchSampler shards by rank itself
        trainer_kwargs.setdefault("early_stopping", early_stopping)
        trainer_kwargs.setdefault("early_stopping_patience", early_stopping_patience)
        trainer_kwargs.setdefault("enable_progress_bar", enable_progress_bar)
        if splitter.n_val > 0:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        # scvi-tools leaves the module in eval mode after training or loading, and Lightning (>= 2.2) keeps the
        # modes it finds: without this a second train() call (or training a loaded model) would run with
        # BatchNorm on its running statistics and dropout off
        self.module.train()
        callbacks = list(trainer_kwargs.get("callbacks") or [])
        if enable_progress_bar and trainer_kwargs.get("simple_progress_bar", True):
            from lightning.pytorch.callbacks import ProgressBar

            from .callbacks import EpochProgressBar  # the loss and the clusters on the bar, no v_num

            trainer_kwargs["simple_progress_bar"] = False
            if not any(isinstance(c, ProgressBar) for c in callbacks):  # the user's own bar wins
                trainer_kwargs["callbacks"] = [*callbacks, EpochProgressBar()]
        with quiet_lightning():
            runner = self._train_runner_cls(
                self,
                training_plan=plan,
                data_splitter=splitter,
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                **trainer_kwargs,
            )
            out = runner()
        self._set_cluster_components()
        self._numeric_history()
        return out

    def _numeric_history(self) -> None:
        """scvi-tools' logger stores metrics in object columns; make them float64 (plain numbers)."""
        if isinstance(self.history_, dict):
            self.history_ = {k: v.apply(pd.to_numeric, errors="coerce") for k, v in self.history_.items()}

    # -------------------------------------------------------------------------------------------- inference
    def _minibatches(
        self, adata=None, indices: Sequence[int] | None = None, batch_size: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, batch_index)`` minibatches on the module's device, in the order of ``indices`` (without the
        covariates: :meth:`_minibatch_args` has them)."""
        for x, b, _ in self._minibatch_args(adata, indices, batch_size):
            yield x, b

    def _minibatch_args(
        self, adata=None, indices: Sequence[int] | None = None, batch_size: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """``(x, batch_index, covs)`` minibatches on the module's device, in the order of ``indices``; ``covs`` the
        registered covariates as the module's keyword arguments (``cat_covs``, ``cont_covs``, ``size_factor``)."""
        adata = self._validate_anndata(adata)
        manager = self.get_anndata_manager(adata, required=True)
        if indices is not None:
            indices = np.asarray(indices)
            if indices.dtype == bool:
                indices = np.flatnonzero(indices)
        counts, batch = registered_arrays(manager, indices, stream=True)
        covs = registered_covariates(manager, indices)
        if isinstance(counts, BackedMatrix):  # read from the file minibatch by minibatch (rows None: all, in order)
            ds = CountsDataset(counts, batch, rows=indices, covariates=covs)
        else:
            max_bytes = 0 if sp.issparse(counts) else MAX_DENSE_BYTES
            ds = CountsDataset(counts, batch, max_dense_bytes=max_bytes, covariates=covs)
        device = self.module.device
        for idx in MinibatchSampler(len(ds), batch_size or settings.batch_size, shuffle=False):
            item = ds[idx]
            kwargs = {k: v.to(device) for k, v in covariate_kwargs(item).items()}
            yield item[REGISTRY_KEYS.X_KEY].to(device), item[REGISTRY_KEYS.BATCH_KEY].to(device), kwargs

    def _collect(self, fn, adata, indices, batch_size) -> np.ndarray:
        """``fn(x, batch_index, **covs)`` over the minibatches, concatenated along the cells."""
        self._check_if_trained(warn=False)
        with torch.inference_mode():
            parts = [fn(x, b, **c).cpu().numpy() for x, b, c in self._minibatch_args(adata, indices, batch_size)]
        return np.concatenate(parts, axis=0)

    def get_latent_representation(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The latent of each cell, shape ``(n_cells, n_latent)``, as scvi-tools' ``SCVI.get_latent_representation``:
        the posterior mean :math:`E_q[z \\mid x, s]` (``give_mean=True``) or one draw :math:`z \\sim q(z \\mid x, s)`
        (a new one each call); ``return_dist=True`` returns the posterior's ``(means, variances)`` instead.
        ``mc_samples`` is accepted for scvi-tools compatibility and unused (q is Gaussian: its mean is exact)."""
        if return_dist:
            self._check_if_trained(warn=False)
            means, variances = [], []
            with torch.inference_mode():
                for x, b, c in self._minibatch_args(adata, indices, batch_size):
                    m, v = self.module.latent_moments(x, b, **c)
                    means.append(m.cpu().numpy())
                    variances.append(v.cpu().numpy())
            return np.concatenate(means, axis=0), np.concatenate(variances, axis=0)
        fn = self.module.latent_mean if give_mean else self.module.latent_sample
        return self._collect(fn, adata, indices, batch_size)

    def get_cluster_probabilities(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 100,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """:math:`q(c \\mid z)`, shape ``(n_cells, K)`` (``normal``: one column of ones): at the posterior mean z
        (``give_mean=True``), or averaged over ``mc_samples`` posterior draws :math:`z \\sim q(z \\mid x, s)`
        (``give_mean=False``: the posterior expectation :math:`E_q[q(c \\mid z)]`, which also reflects how uncertain
        the cell's position is)."""
        return self._collect(
            lambda x, b, **c: self.module.cluster_probs(x, b, give_mean=give_mean, mc_samples=mc_samples, **c),
            adata,
            indices,
            batch_size,
        )

    def _set_cluster_components(self) -> None:
        """After training: the components reported as clusters (``cluster_components_``), those that are the most
        probable component of at least :func:`~pyro_vmm.defaults.min_cluster_size` training cells (see
        :func:`~pyro_vmm.defaults.final_components`).  A query model keeps its reference's."""
        if self.module.prior.n_components < 2 or self.module.frozen_prior:
            return
        probs = self.get_cluster_probabilities()
        self.cluster_components_ = final_components(probs, min_cluster_size(probs.shape[0]))

    def get_cluster_assignments(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        all_components: bool = False,
    ) -> np.ndarray:
        """The cluster of each cell, shape ``(n_cells,)``: :math:`\\arg\\max_k q(c = k \\mid z)` at the posterior mean
        z over the components reported as clusters (``cluster_components_``: those that were the most probable
        component of at least :func:`~pyro_vmm.defaults.min_cluster_size` training cells), so the cells of a
        near-empty component go to their most probable remaining one.  ``all_components=True``: the argmax over
        all ``K`` components.  Labels are component indices (columns of :meth:`get_cluster_probabilities`)."""
        probs = self.get_cluster_probabilities(adata, indices, batch_size=batch_size)
        kept = getattr(self, "cluster_components_", None)
        if all_components or kept is None:
            return probs.argmax(axis=1).astype(np.int64)
        kept = np.asarray(kept, dtype=np.int64)
        return kept[probs[:, kept].argmax(axis=1)]

    def n_utilized_clusters(self, adata=None) -> int:
        """Number of distinct cluster assignments over the cells of ``adata``."""
        return int(np.unique(self.get_cluster_assignments(adata)).size)

    def get_elbo(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        r"""The ELBO :math:`\mathbb E_q[\log p(x \mid z)] - \mathrm{KL}(q(z \mid x) \,\|\, p(z))` per cell (higher is
        better; networks in eval mode), as scvi-tools' ``get_elbo``.  The mean over cells is the training loss's
        estimate negated (Pyro's ``TraceMeanField_ELBO``: analytic KL where known); per cell (``return_mean=False``)
        it is one draw of :math:`\log p(x \mid z) + \log p(z) - \log q(z \mid x)`.  ``model.history["elbo_train"]`` /
        ``["elbo_validation"]`` hold the negative, the loss.
        """
        if not return_mean:  # log p(x|z) + log p(z) - log q(z|x) at one draw per cell
            return self._collect(
                lambda x, b, **c: self.module.log_weights(x, b, 1, **c)[0][0], adata, indices, batch_size
            )
        self._check_if_trained(warn=False)
        svi = AlternatingSVI(self.module, make_optimizers=False)
        total, n = 0.0, 0
        for x, b, c in self._minibatch_args(adata, indices, batch_size):
            total -= svi.evaluate_loss(x, b, **c) * x.shape[0]
            n += x.shape[0]
        return total / n

    def get_marginal_ll(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        n_mc_samples: int = 1000,
        batch_size: int | None = None,
        return_mean: bool = True,
        n_mc_samples_per_pass: int = 100,
    ) -> float | np.ndarray:
        r"""Importance-sampled marginal log-likelihood :math:`\log p(x_n \mid \ell_n, s_n)` per cell, as
        scvi-tools' ``get_marginal_ll`` (higher is better): :math:`\operatorname{LSE}_s \log w_{ns} - \log S` with
        :math:`w_{ns} = p(x_n \mid z_{ns})\, p(z_{ns}) / q(z_{ns} \mid x_n)`, :math:`z_{ns} \sim q(z \mid x_n)`,
        :math:`S` = ``n_mc_samples``; :math:`p(z)` is the model's prior (VMM: the marginal mixture).  Unlike the
        ELBO it compares priors on the evidence itself.  Returns the mean over cells, or ``(n_cells,)`` values.
        """
        values = self._collect(
            lambda x, b, **c: self.module.marginal_ll(x, b, n_mc_samples, n_mc_samples_per_pass, **c),
            adata,
            indices,
            batch_size,
        )
        return float(values.mean()) if return_mean else values

    def get_reconstruction_error(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> dict[str, float | np.ndarray]:
        r"""``{"reconstruction_loss": -log p(x_n | z_n, l_n, s_n)}`` at one draw :math:`z_n \sim q(z \mid x_n)`,
        networks in eval mode, as scvi-tools' ``get_reconstruction_error``; the mean over cells, or per cell."""
        values = self._collect(lambda x, b, **c: -self.module.log_weights(x, b, 1, **c)[1][0], adata, indices,
                               batch_size)
        return {"reconstruction_loss": float(values.mean()) if return_mean else values}

    def posterior_predictive_sample(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
        **kwargs,
    ):
        """Replicated counts :math:`\\tilde x \\sim p(x \\mid z)`, :math:`z \\sim q(z \\mid x)`, as ``sparse.GCXS``.

        Shape ``(n_cells, n_genes)`` when ``n_samples == 1``, else ``(n_cells, n_genes, n_samples)`` (the layout
        ``scvi.criticism.PosteriorPredictiveCheck`` expects)."""
        import sparse

        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        if gene_list is None:
            gene_mask = slice(None)
        else:
            gene_mask = np.isin(np.asarray(adata.var_names), np.asarray(list(gene_list)))
            if not gene_mask.any():
                raise ValueError("none of the genes in gene_list are in adata.var_names; check the gene names")
        parts = []
        with torch.inference_mode():
            for x, b, c in self._minibatch_args(adata, indices, batch_size):
                rep = self.module.posterior_predictive(x, b, n_samples, **c)[:, gene_mask]  # (B, G', S)
                rep = rep[..., 0] if n_samples == 1 else rep
                parts.append(sparse.COO.from_numpy(rep.cpu().numpy()))
        # concatenate as COO (GCXS concatenation is slow to compile in numba), convert once
        return sparse.concatenate(parts, axis=0).asformat("gcxs", compressed_axes=(0,))

    # -------------------------------------------------------------------------------------------- genes
    def _validate_anndata(self, adata=None, copy_if_view: bool = True):
        """scvi-tools' check and transfer, plus, for an AnnData other than the model's (a query): the model's genes in
        the model's order (scvi-tools only compares their number, so a reordered query would silently be read
        gene-by-position), raw counts, and only batches the model knows, each refused with a clear error; new label
        categories are accepted (labels are carried along, not used by the model)."""
        if adata is None or adata is self.adata or self.adata is None:
            return super()._validate_anndata(adata, copy_if_view=copy_if_view)
        from scvi.data._utils import _assign_adata_uuid
        from scvi.model.base._base_model import _check_if_view

        from .validation import validate_genes_match, validate_query

        validate_genes_match(self.adata.var_names, adata.var_names, where="the query AnnData")
        store = type(self)._per_instance_manager_store.get(self.id, {})
        known = store.get(adata.uns.get("_scvi_uuid"))
        if known is not None and known.adata is adata:  # transferred before: scvi-tools replays the registration
            return super()._validate_anndata(adata, copy_if_view=copy_if_view)
        # a new AnnData, or a copy of a registered one (it carries the original's uuid): check, then transfer
        _check_if_view(adata, copy_if_view=copy_if_view)
        args = self.adata_manager.registry["setup_args"]
        batches = self.adata_manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping
        validate_query(adata, layer=args.get("layer"), batch_key=args.get("batch_key"),
                       labels_key=args.get("labels_key"), model_batches=batches,
                       **covariate_query_args(self.adata_manager.registry))
        _assign_adata_uuid(adata, overwrite=True)
        self._register_manager_for_instance(self.adata_manager.transfer_fields(adata, extend_categories=True))
        return adata

    @classmethod
    def prepare_query_anndata(
        cls, adata, reference_model: VMMSCVI | str | os.PathLike, return_reference_var_names: bool = False,
        inplace: bool = True,
    ):
        """Put ``adata`` on the genes of ``reference_model`` (a model, or the folder it was saved to), as scvi-tools'
        ``prepare_query_anndata``: the reference's genes missing from ``adata`` are added as all-zero columns (not
        measured) and the genes are put in the reference's order (others dropped).  ``inplace`` (default) changes
        ``adata`` itself and returns ``None``; else a new AnnData is returned.  ``return_reference_var_names``:
        return the reference's genes only.  See :func:`pyro_vmm.query.prepare_query_anndata`."""
        from .query import prepare_query_anndata

        return prepare_query_anndata(
            cls, adata, reference_model, return_reference_var_names=return_reference_var_names, inplace=inplace
        )

    @classmethod
    def from_scvi_model(
        cls, scvi_model, adata=None, prior: str = "vmm", n_clusters: int = 100, seed: int | None = None, **kwargs
    ) -> VMMSCVI:
        """A VMMSCVI with the encoder, decoder and dispersion of a trained ``scvi.model.SCVI`` (as scvi-tools'
        ``SCANVI.from_scvi_model``), on ``adata`` (default: the SCVI model's AnnData) registered with the SCVI model's
        setup arguments; the prior's pseudo-inputs are random cells.  Before training its posterior mean is SCVI's
        ``get_latent_representation``; :meth:`train` then fits the prior and fine-tunes.  An SCVI whose architecture,
        genes, batches or covariate categories differ is refused with an error naming the difference.  See
        :mod:`pyro_vmm.from_scvi`."""
        from .from_scvi import from_scvi_model

        return from_scvi_model(cls, scvi_model, adata=adata, prior=prior, n_clusters=n_clusters, seed=seed, **kwargs)

    @classmethod
    def load_query_data(
        cls,
        adata,
        reference_model: VMMSCVI | str | os.PathLike,
        freeze_batchnorm: bool = True,
        train_encoder: bool | None = None,
    ) -> VMMSCVI:
        """Reference mapping (scArches-style): a copy of ``reference_model`` (a trained model, or the folder it was
        saved to) for the cells of ``adata``, whose only trainable parameters are the weights of the query's new
        batches; the prior is frozen, so :meth:`train` fits those weights and the query cells get the reference's
        clusters.  See :mod:`pyro_vmm.query`."""
        from .query import load_query_data

        return load_query_data(
            cls, adata, reference_model, freeze_batchnorm=freeze_batchnorm, train_encoder=train_encoder
        )

    @classmethod
    def load(cls, dir_path: str, adata=None, *args, prefix: str | None = None, **kwargs):
        """``BaseModelClass.load`` with clear errors: an unreadable or foreign ``model.pt``, and an ``adata`` whose
        genes differ from the saved model's (names and order), are refused before anything is built."""
        from .validation import validate_genes_match

        saved = cls._read_saved(dir_path, prefix)
        if adata is not None and saved.get("var_names") is not None:
            validate_genes_match(saved["var_names"], adata.var_names, where="the AnnData given to load")
        model = super().load(dir_path, adata, *args, prefix=prefix, **kwargs)
        if getattr(model, "reference_batches_", None) is not None:  # a saved query model: freeze it again
            from .query import freeze_for_query

            freeze_for_query(model)
        return model

    @classmethod
    def _read_saved(cls, dir_path: str | os.PathLike, prefix: str | None = None) -> dict:
        """The contents of ``dir_path/model.pt`` written by :meth:`save`; clear errors for a missing, unreadable or
        foreign file."""
        from .validation import InputError

        path = Path(dir_path) / f"{prefix or ''}model.pt"
        if not path.is_file():
            raise InputError(f"no saved model at {str(path)!r}. Fix: pass the folder written by model.save(dir_path).")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # truncated, garbage, or not a torch file at all
            raise InputError(
                f"cannot read the saved model {str(path)!r} ({type(err).__name__}: {err}); the file is corrupted or "
                "was not written by model.save(). Fix: save the model again, or restore the folder from a copy."
            ) from err
        if not isinstance(saved, dict) or "model_state_dict" not in saved or "attr_dict" not in saved:
            raise InputError(
                f"{str(path)!r} is not a saved scvi-tools model (no model_state_dict/attr_dict in it). "
                "Fix: pass the folder written by VMMSCVI.save(dir_path)."
            )
        class_name = saved["attr_dict"].get("registry_", {}).get("model_name")
        if class_name not in (None, cls.__name__):
            raise InputError(
                f"{str(path)!r} holds a {class_name} model, not a {cls.__name__}. Fix: load it with "
                f"{class_name}.load(...), or pass the folder of a saved {cls.__name__}."
            )
        return saved

    # -------------------------------------------------------------------------------------------- save
    def save(
        self,
        dir_path: str,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        save_kwargs: dict | None = None,
        **anndata_write_kwargs,
    ) -> None:
        """Save like ``BaseModelClass.save``, atomically: files are written to a temporary folder next to
        ``dir_path`` and each is moved into place only once all were written."""
        target = Path(dir_path)
        if target.exists() and not overwrite:
            raise ValueError(f"{dir_path} already exists; pass overwrite=True or choose another directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            super().save(
                str(tmp),
                prefix=prefix,
                overwrite=True,
                save_anndata=save_anndata,
                save_kwargs=save_kwargs,
                **anndata_write_kwargs,
            )
            target.mkdir(exist_ok=True)
            for item in tmp.iterdir():
                os.replace(item, target / item.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
