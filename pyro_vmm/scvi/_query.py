r"""Reference mapping (scArches-style, Lotfollahi et al. 2022): place the cells of new batches into a trained VMM-scVI.

The query model is the reference model with its batch one-hot widened to the query's new batches.  The weights of
the new batch columns in the first layer of the encoder :math:`q_\phi(z \mid x, s)` and of the decoder
:math:`f_\theta(z, s)` start at zero, so every reference cell is encoded and decoded exactly as before; they are the
only parameters trained on the query (the encoder's by default only under the N(0, I) prior: see
:func:`load_query_data`).  Everything else is frozen: the other network weights, the per-gene
dispersion, the BatchNorm statistics and the whole VMM prior (no EM step), so the query cells are assigned to the
reference's clusters, :math:`q(c \mid z)` with the reference's :math:`\pi, m_k, S_k, P_k`.  The pseudo-inputs keep
their batch vectors (the new batches get weight 0 in their softmax), so the prior is unchanged.  Query training runs
in training mode (dropout on) with every BatchNorm normalising by the reference's running statistics: on minibatch
statistics a one-batch minibatch would cancel the new columns' shift, and they would learn nothing.  A saved query
model is frozen the same way again when ``VMMSCVI.load`` reads it back.

>>> query_model = VMMSCVI.load_query_data(query_adata, reference_model)
>>> query_model.train(max_epochs=100, seed=0)
>>> query_adata.obs["vmm_cluster"] = query_model.get_cluster_assignments()
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = ["covariate_query_args", "freeze_for_query", "load_query_data", "prepare_query_anndata"]

#: logit of a new batch in the pseudo-inputs' softmax batch vector (its weight underflows to exactly 0)
NEW_BATCH_LOGIT = -1e4


def covariate_query_args(registry: dict) -> dict:
    """The covariate arguments of :func:`pyro_vmm.validation.validate_query` for a model's registry: the size-factor
    and continuous keys, and each categorical covariate's categories."""
    from scvi import REGISTRY_KEYS

    args = registry["setup_args"]
    cat_state = registry["field_registries"].get(REGISTRY_KEYS.CAT_COVS_KEY, {}).get("state_registry", {})
    return {
        "size_factor_key": args.get("size_factor_key"),
        "categorical_covariates": {k: list(v) for k, v in cat_state.get("mappings", {}).items()},
        "continuous_covariate_keys": list(args.get("continuous_covariate_keys") or []),
    }


def _widen(old: torch.Tensor, new: torch.Tensor, fill: float = 0.0, at: int | None = None) -> torch.Tensor:
    """``old`` in a tensor shaped like ``new`` with ``new.shape[1] - old.shape[1]`` columns holding ``fill`` inserted
    before ``old``'s column ``at`` (default: appended); the columns after ``at`` (covariates after the batch) move."""
    at = old.shape[1] if at is None else int(at)
    n_added = new.shape[1] - old.shape[1]
    out = torch.full_like(new, fill)
    out[:, :at] = old[:, :at]
    out[:, at + n_added :] = old[:, at:]
    return out


def _column_mask_hook(columns: torch.Tensor):
    """A gradient hook that keeps the gradient of ``columns`` (the new batches' weights) and zeroes the rest."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros_like(grad)
        keep[:, columns] = grad[:, columns]
        return keep

    return hook


def _normalise_with_reference_statistics(bn: torch.nn.BatchNorm1d, args) -> None:
    """Forward pre-hook of a frozen BatchNorm: normalise with its stored (the reference's) running statistics, also
    in training mode.  On minibatch statistics the shift a new batch column adds to every query cell of a one-batch
    minibatch is subtracted again with the minibatch mean, so that column would get no gradient at all."""
    bn.training = False


def _batch_offsets(module) -> tuple[int, int]:
    """First column of the batch one-hot in the first encoder and first decoder layers (after the counts or z and the
    continuous covariates)."""
    return module.n_input + module.n_cont_input, module.n_latent + module.n_continuous_cov


def _first_layer_weights(module) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """The weights of the first encoder and first decoder layers: the ones whose columns include the batch one-hot."""
    return module.encoder.fc_layers[0][0].weight, module.decoder.px_decoder.fc_layers[0][0].weight


@dataclass
class _Reference:
    """What reference mapping needs of a reference model, from the model object or from its saved folder."""

    registry: dict
    init_params: dict
    state_dict: dict
    var_names: pd.Index


def _reference(cls, reference_model, trained: bool = True) -> _Reference:
    """:class:`_Reference` of a ``cls`` model or of the folder one was saved to (``model.save``); it must have been
    trained when ``trained``."""
    from ..validation import InputError

    if isinstance(reference_model, (str, os.PathLike)):
        saved = cls._read_saved(reference_model)
        attr = saved["attr_dict"]
        if trained and not attr.get("is_trained_", False):
            raise InputError(f"the model saved in {str(reference_model)!r} was never trained. Fix: train it first.")
        state = {k: v for k, v in saved["model_state_dict"].items() if k != "pyro_param_store"}
        return _Reference(attr["registry_"], attr["init_params_"], state, pd.Index(saved["var_names"]))
    if not isinstance(reference_model, cls):
        raise TypeError(
            f"reference_model must be a trained {cls.__name__} or the folder it was saved to, got "
            f"{type(reference_model).__name__}. Fix: pass the model, or the path given to model.save(path)."
        )
    if trained:
        reference_model._check_if_trained(warn=False)
    return _Reference(
        reference_model.adata_manager.registry,
        reference_model.init_params_,
        reference_model.module.state_dict(),
        pd.Index(reference_model.adata.var_names),
    )


def prepare_query_anndata(
    cls, adata, reference_model, return_reference_var_names: bool = False, inplace: bool = True
):
    """``adata`` on the genes of ``reference_model`` (a model or its saved folder), as scvi-tools'
    ``ArchesMixin.prepare_query_anndata``: the reference's missing genes added as all-zero columns (also in every
    layer), the genes put in the reference's order, genes the reference lacks dropped.  Returns ``None`` with
    ``inplace`` (``adata`` is changed), else the new AnnData; only the reference's genes (a ``pandas.Index``) with
    ``return_reference_var_names``.  A query with fewer than half of the reference's genes gets a warning."""
    import anndata
    from scipy import sparse as sp

    from ..validation import InputError, InputWarning

    genes = _reference(cls, reference_model, trained=False).var_names
    if return_reference_var_names:
        return genes
    if not adata.var_names.is_unique:
        dups = adata.var_names[adata.var_names.duplicated()].unique()
        raise InputError(
            f"the query AnnData has {len(dups):,} duplicated gene name(s) (first: {list(map(str, dups[:5]))}), so its "
            "genes cannot be matched to the reference's. Fix: adata.var_names_make_unique(), or sum the duplicates."
        )
    shared = adata.var_names.intersection(genes)
    if len(shared) == 0:
        raise InputError(
            f"the query AnnData has none of the reference's {len(genes):,} genes (query genes, first: "
            f"{list(map(str, adata.var_names[:5]))}; reference genes, first: {list(map(str, genes[:5]))}). Fix: use "
            "the same gene identifiers as the reference data (symbols vs Ensembl ids)."
        )
    if len(shared) < 0.5 * len(genes):
        warnings.warn(
            f"the query AnnData has only {len(shared):,} of the reference's {len(genes):,} genes; the other "
            f"{len(genes) - len(shared):,} are added as zeros (not measured), which may map its cells poorly.",
            InputWarning,
            stacklevel=3,
        )
    missing = genes.difference(adata.var_names)
    out = adata
    if len(missing):
        zeros = sp.csr_matrix((adata.n_obs, len(missing)), dtype=getattr(adata.X, "dtype", np.float32))
        padding = anndata.AnnData(
            X=zeros, layers={k: zeros.copy() for k in adata.layers}, var=pd.DataFrame(index=missing),
            obs=pd.DataFrame(index=adata.obs_names),
        )
        out = anndata.concat([adata, padding], axis=1, join="outer", merge="first", uns_merge="first")
        out.obs = adata.obs.copy()
    out = out[:, genes].copy() if not out.var_names.equals(genes) else out
    if not inplace:
        return out if out is not adata else adata.copy()
    if out is not adata:
        adata._init_as_actual(out)
    return None


def load_query_data(
    cls, adata, reference_model, freeze_batchnorm: bool = True, train_encoder: bool | None = None
) -> Any:
    """Build the query model of ``reference_model`` for ``adata`` (see the module docstring); returns a ``cls``.

    ``adata`` must have the reference's genes in the reference's order, raw counts where the reference reads them,
    the reference's batch column (and labels column, if it had one; new label values are fine) and at least one batch
    the reference was not trained on; it is registered in place (``cls.setup_anndata``).  ``freeze_batchnorm`` keeps
    the BatchNorm running statistics of encoder and decoder (so reference cells map exactly as before).
    ``train_encoder``: train the encoder's new batch columns as well as the decoder's.  Default: only with the
    N(0, I) prior.  Under a frozen mixture prior (VMM, GMM, VampPrior) the shift those columns give every cell of a
    query batch is pulled by the KL term towards dense components, not towards the cells' types (kang, stimulated
    onto control cells: kNN label transfer 0.61 with them trained, 0.79 without; N(0, I): 0.81), so by default the
    query cells are encoded as the reference encodes them and only the decoder learns the new batch.
    """
    from scvi import REGISTRY_KEYS

    from ..validation import (
        InputError,
        InputWarning,
        validate_genes_match,
        validate_query,
    )

    ref = _reference(cls, reference_model)
    args = dict(ref.registry["setup_args"])
    if args.get("batch_key") is None:
        raise InputError(
            "the reference model was set up without a batch_key, so it has no batch input to extend. Fix: embed the "
            "query directly with reference_model.get_latent_representation(adata), or train the reference with a "
            "batch_key."
        )
    validate_genes_match(ref.var_names, adata.var_names, where="the query AnnData")
    batch_state = ref.registry["field_registries"][REGISTRY_KEYS.BATCH_KEY]["state_registry"]
    ref_batches = [str(b) for b in batch_state["categorical_mapping"]]
    with warnings.catch_warnings():  # setup_anndata below checks (and warns about) the counts again
        warnings.simplefilter("ignore", InputWarning)
        validate_query(adata, layer=args.get("layer"), batch_key=args["batch_key"], labels_key=args.get("labels_key"),
                       model_batches=ref_batches, allow_new_batches=True, **covariate_query_args(ref.registry))
    query_batches = np.unique(np.asarray(adata.obs[args["batch_key"]].astype(str)))
    if all(b in ref_batches for b in query_batches):
        raise InputError(
            f"the query AnnData has no batch the reference lacks (its batches: {list(map(str, query_batches))}), so "
            "there is nothing to map. Fix: embed it directly with reference_model.get_latent_representation(adata)."
        )

    keys = ("layer", "batch_key", "labels_key", "size_factor_key", "categorical_covariate_keys",
            "continuous_covariate_keys")
    setup = {k: args.get(k) for k in keys}
    cls.setup_anndata(adata, source_registry=ref.registry, extend_categories=True, **setup)
    init = ref.init_params
    params = {**init.get("non_kwargs", {}), **init.get("kwargs", {}).get("module_kwargs", {})}
    model = cls(adata, **params)
    module = model.module
    g = module.n_input
    n_ref = len(ref_batches) if len(ref_batches) > 1 else 0  # a one-batch reference has no batch columns
    enc_at, dec_at = _batch_offsets(module)

    # the reference's parameters, widened where the batch one-hot grew
    names = {id(p): name for name, p in module.named_parameters()}
    first_layers = {names[id(w)] for w in _first_layer_weights(module)}
    old_state = ref.state_dict
    state = module.state_dict()
    for key, value in state.items():
        old = old_state[key]
        if old.shape == value.shape:
            state[key] = old.clone()
        elif key.startswith("prior.") and "pseudo_inputs" in key:  # (K, G + batches): new batches' logits -> -inf
            widened = _widen(old, value, NEW_BATCH_LOGIT, at=g + n_ref)
            if len(ref_batches) == 1:  # a one-batch reference: its batch (code 0) gets the whole softmax
                widened[:, g] = 0.0
            state[key] = widened
        elif key in first_layers:  # the new batches' columns start at zero
            enc = key.startswith("encoder.")
            state[key] = _widen(old, value, 0.0, at=(enc_at if enc else dec_at) + n_ref)
        else:
            raise RuntimeError(f"cannot map parameter {key!r} from shape {tuple(old.shape)} to {tuple(value.shape)}")
    module.load_state_dict(state)
    model.reference_batches_ = ref_batches
    model.cluster_of_component_ = getattr(reference_model, "cluster_of_component_", None)  # the reference's clusters
    model.query_freeze_batchnorm_ = bool(freeze_batchnorm)
    model.query_train_encoder_ = bool(module.prior.name == "normal" if train_encoder is None else train_encoder)
    freeze_for_query(model)
    model.is_trained_ = False
    return model


def freeze_for_query(model) -> None:
    """Freeze ``model``'s module for query training: only the columns of the batches not in
    ``model.reference_batches_`` in the first decoder layer (and, with ``model.query_train_encoder_``, the first
    encoder layer) get gradients; no EM step
    (``module.frozen_prior``); with ``model.query_freeze_batchnorm_`` (default True) the BatchNorm running statistics
    stay fixed.  Called by :func:`load_query_data` and again by ``VMMSCVI.load`` on a saved query model, since neither
    ``requires_grad`` flags nor gradient hooks are saved."""
    module = model.module
    g, d = _batch_offsets(module)
    new_codes = torch.arange(len(model.reference_batches_), module.n_batch)
    for p in module.parameters():
        p.requires_grad_(False)
    enc, dec = _first_layer_weights(module)
    train_encoder = getattr(model, "query_train_encoder_", True) and module.n_batch_input > 0  # batch in the encoder
    trained = [(dec, d)] + ([(enc, g)] if train_encoder else [])
    for weight, offset in trained:
        weight.requires_grad_(True)
        weight.register_hook(_column_mask_hook(offset + new_codes))
    if getattr(model, "query_freeze_batchnorm_", True):
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.register_forward_pre_hook(_normalise_with_reference_statistics)  # running statistics never move
    module.frozen_prior = True  # read by VMMTrainingPlan: no EM step
