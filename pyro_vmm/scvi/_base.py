r"""``PyroVMMModel``: the scvi-tools model class of any Pyro program with a VMM (or other) latent prior.

Everything that is not the model itself lives here, written once: AnnData validation and transfer, training (the
alternating VI / EM step of :class:`~pyro_vmm.scvi._trainingplan.VMMTrainingPlan`, both Adam optimisers, the prior
learning-rate ratio, KL warm-up, early stopping, the recipe of :mod:`pyro_vmm.defaults`), the NaN guard,
checkpoints and exact resume (:mod:`pyro_vmm.scvi._resume`), data-parallel training, minibatches from memory or
streamed from a backed AnnData (:mod:`pyro_vmm.scvi._data`), save/load with clear errors, latents, cluster
probabilities and assignments, ELBO / marginal likelihood, posterior predictive samples
(:mod:`pyro_vmm.scvi._latent`), and reference mapping (:mod:`pyro_vmm.scvi._query`).

A model family is one Pyro module in ``models/`` plus a thin subclass with three hooks:

``setup_anndata``
    registers the AnnData fields (scvi-tools ``AnnDataManager`` fields; the counts under ``REGISTRY_KEYS.X_KEY``
    and a batch under ``REGISTRY_KEYS.BATCH_KEY``, as every scvi-tools model);
``_data_fields``
    ``{registry key: keyword}``: the other registered fields each minibatch carries, and the keyword the module's
    methods take them by (categorical fields come as int64 codes, the rest as float32);
``__init__``
    builds ``self.module`` with :meth:`_init_module` (seeded weights, the VampPrior's pseudo-input cells) and sets
    ``self.init_params_ = self._get_init_params(locals())``.

The module is a ``PyroBaseModuleClass`` meeting :class:`~pyro_vmm.infer.AlternatingSVI`'s contract (``model`` /
``guide`` with the latent at site ``"z"``, a :class:`~pyro_vmm.priors.LatentPrior` at ``prior``,
``pseudo_posterior(u)``), with ``frozen_prior`` (``False``), ``device``, ``_get_fn_args_from_batch(minibatch)`` for
training, ``on_load`` that only clears Pyro's param store (every parameter is in ``state_dict``), and, called as ``f(x, batch_index, **fields)``: ``latent_mean``, ``latent_sample``, ``latent_moments``,
``cluster_probs``, ``log_weights``, ``marginal_ll`` and ``posterior_predictive`` (see
:class:`~pyro_vmm.models.scvi.VMMSCVIModule`).  A new family, e.g. an N(0, I)-or-VMM LDVAE::

    class VMMLDVAE(PyroVMMModel):
        _module_cls = LDVAEModule                         # models/ldvae.py: model, guide, prior, pseudo_posterior, ...
        _data_fields = {}                                 # counts and batch only

        @classmethod
        def setup_anndata(cls, adata, layer=None, batch_key=None, **kwargs):
            args = cls._get_setup_method_args(**locals())
            fields = [LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
                      CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key)]
            manager = AnnDataManager(fields=fields, setup_method_args=args)
            manager.register_fields(adata, **kwargs)             # kwargs: scvi-tools' load / query transfer
            cls.register_manager(manager)

        def __init__(self, adata, prior="vmm", n_clusters=30, n_latent=10, seed=None):
            super().__init__(adata)
            self._init_module(self.summary_stats.n_vars, self.summary_stats.n_batch, n_latent=n_latent,
                              prior=prior, n_clusters=n_clusters, seed=seed)
            self.init_params_ = self._get_init_params(locals())
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pyro
import torch
from scipy import sparse as sp
from scvi import REGISTRY_KEYS, settings
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner

from ..callbacks import ComponentMerging
from ..defaults import DEFAULTS, merge_epochs, training_epochs
from ..quiet import quiet_lightning
from ..utils import set_seed
from ._data import InMemoryDataSplitter, registered_arrays, registered_fields
from ._latent import LatentMixin
from ._query import covariate_query_args
from ._resume import load_training_checkpoint
from ._trainingplan import VMMTrainingPlan, ddp_strategy, is_data_parallel

__all__ = ["PyroVMMModel"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# The model class
# ---------------------------------------------------------------------------------------------------------------
class PyroVMMModel(LatentMixin, BaseModelClass):
    """The generic scvi-tools model of a Pyro module (see the module docstring for the hooks and the contract)."""

    _module_cls: ClassVar[type | None] = None
    _training_plan_cls = VMMTrainingPlan
    _data_splitter_cls = InMemoryDataSplitter
    _train_runner_cls = TrainRunner
    #: ``{registry key: module keyword}`` of the registered fields a minibatch carries besides counts and batch
    _data_fields: ClassVar[dict[str, str]] = {}

    def __init__(self, adata) -> None:
        pyro.clear_param_store()  # nothing of ours lives there; clears leftovers of other Pyro models
        super().__init__(adata)

    # -------------------------------------------------------------------------------------------- for __init__
    def _init_module(
        self, *args, prior: str, n_clusters: int, seed: int | None, rng: np.random.Generator | None = None,
        pseudo_fields: tuple[str, ...] = (), **kwargs,
    ) -> None:
        """``self.module = _module_cls(*args, prior=, n_clusters=, pseudo_inputs=, **kwargs)``, its weights drawn from
        ``torch.manual_seed(seed)`` (torch's global RNG untouched) and, for ``vmm``/``vampprior``, its pseudo-inputs
        started from ``K`` random registered cells (drawn by ``rng``, default one seeded by ``seed``)."""
        if int(n_clusters) < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        if rng is None:
            rng = np.random.default_rng(seed if seed is not None else np.random.randint(2**31))
        use_pseudo = prior.lower() in ("vmm", "vampprior")
        pseudo = self._pseudo_input_counts(n_clusters, rng, pseudo_fields) if use_pseudo else None
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.module = self._module_cls(*args, prior=prior, n_clusters=n_clusters, pseudo_inputs=pseudo, **kwargs)

    def _pseudo_input_counts(self, n_clusters: int, rng: np.random.Generator, fields: tuple[str, ...] = ()):
        """The counts ``(K, G)`` of ``K = n_clusters`` cells drawn by ``rng`` (sorted rows; with replacement only when
        ``K`` exceeds the cells), to start the VampPrior's pseudo-inputs from; ``fields``: registry keys of other
        registered matrices of those cells, appended as columns (e.g. proteins); a tensor."""
        n_cells = self.summary_stats.n_cells
        rows = np.sort(rng.choice(n_cells, size=n_clusters, replace=n_clusters > n_cells))
        counts, _ = registered_arrays(self.adata_manager, rows)
        counts = np.asarray(counts.todense() if sp.issparse(counts) else counts)
        extra = registered_fields(self.adata_manager, rows, keys=fields) if fields else {}
        counts = np.hstack([counts, *(extra[key].astype(counts.dtype) for key in fields)]) if fields else counts
        return torch.as_tensor(counts)

    def _registered_fields(self, manager=None, indices: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``{registry key: (N, .) array}`` of the :attr:`_data_fields` registered in ``manager`` (default: the
        model's)."""
        return registered_fields(manager or self.adata_manager, indices, keys=tuple(self._data_fields))

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
        merge_at: Sequence[float] | None = DEFAULTS.merge_at,
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
        """Fit by alternating one VI step and one EM step per minibatch (see :mod:`pyro_vmm.scvi._trainingplan`).

        Reliability: with ``nan_guard`` a step whose losses or parameters go non-finite is rolled back, both learning
        rates are halved and a warning is logged; ``max_nan_retries`` failures in a row raise
        :class:`~pyro_vmm.guard.NonFiniteError`.  With ``checkpoint_dir`` the full training state is written there
        atomically every ``checkpoint_every`` epochs (the 2 newest are kept), and a later call with the same
        arguments and ``resume=True`` continues from the newest one, ending with the same parameters as an
        uninterrupted run (CPU; see :mod:`pyro_vmm.scvi._resume`)::

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
            Stop when ``elbo_validation`` (then logged every epoch, else every ``max_epochs // 10``) has not
            improved for this many epochs (the paper used 100; off by default, as in ``SCVI.train()``).
        n_epochs_kl_warmup
            Epochs of linear KL warm-up (``"auto"``: all of ``max_epochs``, as ``SCVI`` at its defaults; ``None``:
            none, the paper's loss throughout).
        merge_at
            Fractions of ``max_epochs`` at whose end the mixture's components are merged by the final-cluster rule
            (:class:`~pyro_vmm.callbacks.ComponentMerging`, :mod:`pyro_vmm.defaults`); ``None``: none (the paper).
        seed
            Seeds Python, NumPy, torch, Pyro and ``scvi.settings.seed`` (the split) so a CPU run is repeatable.
        plan_kwargs
            Extra :class:`~pyro_vmm.scvi._trainingplan.VMMTrainingPlan` arguments (``adam_eps``,
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
        from ._resume import (
            CHECKPOINT_KIND,
            AtomicCheckpointIO,
            EpochCheckpointer,
            check_resume_payload,
            find_resume_checkpoint,
            run_fingerprint,
        )

        if max_epochs is not None:  # 0 would return at once and mark the model trained
            from ..validation import validate_positive_int

            max_epochs = validate_positive_int("max_epochs", max_epochs)
        data_parallel = is_data_parallel(trainer_kwargs)
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
        merging = ComponentMerging(self._component_clusters, merge_epochs(max_epochs, merge_at))  # checks merge_at
        resume_path = payload = None
        if checkpoint_dir is not None:
            resume_path = find_resume_checkpoint(checkpoint_dir, resume)
            if resume_path is not None:
                payload = load_training_checkpoint(resume_path, CHECKPOINT_KIND)
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
            **{"shuffle_seed": shuffle_seed, "fields": tuple(self._data_fields), **(datasplitter_kwargs or {})},
        )
        if early_stopping and splitter.n_val == 0:
            raise ValueError(
                "early_stopping monitors elbo_validation but the split has no validation cells; "
                "set train_size < 1 (e.g. 0.9) or early_stopping=False"
            )
        plan_kwargs = {
            "nan_guard": nan_guard, "max_nan_retries": max_nan_retries,
            "n_epochs_kl_warmup": n_epochs_kl_warmup,
            "track_utilized_clusters": enable_progress_bar,  # the bar's clusters every epoch, from the EM step's pass
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
            trainer_kwargs["strategy"] = ddp_strategy(trainer_kwargs["strategy"])
            trainer_kwargs["use_distributed_sampler"] = False  # MinibatchSampler shards by rank itself
        trainer_kwargs.setdefault("early_stopping", early_stopping)
        trainer_kwargs.setdefault("early_stopping_patience", early_stopping_patience)
        trainer_kwargs.setdefault("enable_progress_bar", enable_progress_bar)
        if splitter.n_val > 0:  # every epoch to stop early; else ten times a run (SCVI, without stopping: never)
            every = 1 if early_stopping else max(1, max_epochs // DEFAULTS.validations_per_run)
            trainer_kwargs.setdefault("check_val_every_n_epoch", every)
        # scvi-tools leaves the module in eval mode after training or loading, and Lightning (>= 2.2) keeps the
        # modes it finds: without this a second train() call (or training a loaded model) would run with
        # BatchNorm on its running statistics and dropout off
        self.module.train()
        callbacks = list(trainer_kwargs.get("callbacks") or [])
        if merging.epochs and hasattr(self.module.prior, "merge_components") and not self.module.frozen_prior:
            trainer_kwargs["callbacks"] = callbacks = [*callbacks, merging]
        if enable_progress_bar and trainer_kwargs.get("simple_progress_bar", True):
            from lightning.pytorch.callbacks import ProgressBar

            from ..callbacks import EpochProgressBar  # the loss and the clusters on the bar, no v_num

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
        self.merge_moves_ = merging.moves  # (epoch, components kept) of each merge move of this run
        self._set_cluster_components()
        self._numeric_history()
        return out

    def _numeric_history(self) -> None:
        """scvi-tools' logger stores metrics in object columns; make them float64 (plain numbers)."""
        if isinstance(self.history_, dict):
            self.history_ = {k: v.apply(pd.to_numeric, errors="coerce") for k, v in self.history_.items()}

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

        from ..validation import validate_genes_match, validate_query

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
        cls, adata, reference_model: PyroVMMModel | str | os.PathLike, return_reference_var_names: bool = False,
        inplace: bool = True,
    ):
        """Put ``adata`` on the genes of ``reference_model`` (a model, or the folder it was saved to), as scvi-tools'
        ``prepare_query_anndata``: the reference's genes missing from ``adata`` are added as all-zero columns (not
        measured) and the genes are put in the reference's order (others dropped).  ``inplace`` (default) changes
        ``adata`` itself and returns ``None``; else a new AnnData is returned.  ``return_reference_var_names``:
        return the reference's genes only.  See :func:`pyro_vmm.scvi._query.prepare_query_anndata`."""
        from ._query import prepare_query_anndata

        return prepare_query_anndata(
            cls, adata, reference_model, return_reference_var_names=return_reference_var_names, inplace=inplace
        )

    @classmethod
    def load_query_data(
        cls,
        adata,
        reference_model: PyroVMMModel | str | os.PathLike,
        freeze_batchnorm: bool = True,
        train_encoder: bool | None = None,
    ) -> PyroVMMModel:
        """Reference mapping (scArches-style): a copy of ``reference_model`` (a trained model, or the folder it was
        saved to) for the cells of ``adata``, whose only trainable parameters are the weights of the query's new
        batches; the prior is frozen, so :meth:`train` fits those weights and the query cells get the reference's
        clusters.  See :mod:`pyro_vmm.scvi._query`."""
        from ._query import load_query_data

        return load_query_data(
            cls, adata, reference_model, freeze_batchnorm=freeze_batchnorm, train_encoder=train_encoder
        )

    @classmethod
    def load(cls, dir_path: str, adata=None, *args, prefix: str | None = None, **kwargs):
        """``BaseModelClass.load`` with clear errors: an unreadable or foreign ``model.pt``, and an ``adata`` whose
        genes differ from the saved model's (names and order), are refused before anything is built."""
        from ..validation import validate_genes_match

        saved = cls._read_saved(dir_path, prefix)
        if adata is not None and saved.get("var_names") is not None:
            validate_genes_match(saved["var_names"], adata.var_names, where="the AnnData given to load")
        model = super().load(dir_path, adata, *args, prefix=prefix, **kwargs)
        if getattr(model, "reference_batches_", None) is not None:  # a saved query model: freeze it again
            from ._query import freeze_for_query

            freeze_for_query(model)
        return model

    @classmethod
    def _read_saved(cls, dir_path: str | os.PathLike, prefix: str | None = None) -> dict:
        """``dir_path/model.pt`` as written by :meth:`save` (:func:`~pyro_vmm.scvi._checkpoint.read_saved_model`)."""
        from ._checkpoint import read_saved_model

        return read_saved_model(dir_path, cls.__name__, prefix)

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
