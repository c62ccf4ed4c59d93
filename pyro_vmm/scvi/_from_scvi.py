r"""Start a VMM-scVI from a trained ``scvi.model.SCVI`` (as scvi-tools' ``SCANVI.from_scvi_model``).

The VMM-scVI networks are scVI's: :math:`q_\phi(z \mid x, \cdot)` is ``FCLayers`` on ``concat(log1p(x), c, onehot(s),
onehot(k_j)...)`` followed by linear mean and log-variance heads (:math:`\sigma^2 = e^h + 10^{-4}`), and
:math:`p(x \mid z, \cdot)` is ``DecoderSCVI`` with :math:`\theta_g = e^{\mathrm{px\_r}_g}`.  So a trained SCVI with
the same architecture and registry gives its encoder (``z_encoder.encoder``, ``mean_encoder``, ``var_encoder``),
decoder (``decoder.px_decoder``, ``px_scale_decoder``, ``px_dropout_decoder``) and ``px_r`` to a new
:class:`~pyro_vmm.scvi.VMMSCVI` unchanged (BatchNorm running statistics included): before any training the
VMM's posterior mean equals SCVI's ``get_latent_representation``.  The prior is new (pseudo-inputs: random cells);
``train()`` then fits it and fine-tunes the networks.

What must match (anything else is refused with an :class:`~pyro_vmm.validation.InputError` naming it):
``gene_likelihood`` ``zinb``/``nb``, ``dispersion="gene"``, ``latent_distribution="normal"``,
``log_variational=True``, ``use_observed_lib_size=True`` (no size factor: SCVI then decodes with a softplus scale,
this model with a softmax), one-hot batch representation, BatchNorm (not LayerNorm) in encoder and decoder, and the
covariates injected into the first layer only -- ``deeply_inject_covariates=True`` (SCVI's default) is the same
network when ``n_layers=1`` or when there is no covariate to inject, and is refused otherwise; the same genes in the
same order, the same batches and covariate categories.
"""

from __future__ import annotations

from typing import Any

import torch

from ..defaults import DEFAULTS

__all__ = ["from_scvi_model", "scvi_architecture"]

_SETUP_KEYS = (
    "layer",
    "batch_key",
    "labels_key",
    "size_factor_key",
    "categorical_covariate_keys",
    "continuous_covariate_keys",
)


def _layers(fc) -> list[torch.nn.Module]:
    return [m for layer in fc.fc_layers for m in layer if m is not None]


def scvi_architecture(scvi_model: Any) -> dict:
    """The VMMSCVI arguments that reproduce ``scvi_model``'s networks; :class:`InputError` naming what has no
    counterpart here."""
    from scvi.model import SCVI

    from ..validation import InputError

    if not isinstance(scvi_model, SCVI):
        raise InputError(
            f"from_scvi_model needs a scvi.model.SCVI, got {type(scvi_model).__name__}. Fix: pass a trained SCVI."
        )
    if not scvi_model.is_trained:
        raise InputError("the SCVI model was never trained. Fix: call scvi_model.train() first.")
    vae = scvi_model.module
    problems = []

    def need(what: str, have: Any, want: Any) -> None:
        if have != want:
            problems.append(f"{what}={have!r} (VMMSCVI needs {want!r})")

    if vae.gene_likelihood not in ("zinb", "nb"):
        problems.append(f"gene_likelihood={vae.gene_likelihood!r} (VMMSCVI has 'zinb' or 'nb')")
    need("dispersion", vae.dispersion, "gene")
    need("latent_distribution", vae.latent_distribution, "normal")
    need("log_variational", vae.log_variational, True)
    need("use_size_factor_key", bool(getattr(vae, "use_size_factor_key", False)), False)
    need("use_observed_lib_size", vae.use_observed_lib_size, True)
    need("batch_representation", getattr(vae, "batch_representation", "one-hot"), "one-hot")
    enc_fc, dec_fc = vae.z_encoder.encoder, vae.decoder.px_decoder
    for name, fc in (("encoder", enc_fc), ("decoder", dec_fc)):
        kinds = {type(m).__name__ for m in _layers(fc)}
        if "LayerNorm" in kinds:
            problems.append(f"use_layer_norm includes the {name} (VMMSCVI has no LayerNorm)")
        if "BatchNorm1d" not in kinds:
            problems.append(f"use_batch_norm leaves out the {name} (VMMSCVI uses BatchNorm in encoder and decoder)")
    if getattr(vae.decoder, "px_scale_decoder", None) is None or not isinstance(
        vae.decoder.px_scale_decoder[-1], torch.nn.Softmax
    ):
        problems.append("the decoder's scale activation is not a softmax")
    n_layers = len(enc_fc.fc_layers)
    injected = sum(n for n in enc_fc.n_cat_list) + sum(n for n in dec_fc.n_cat_list)
    if n_layers > 1 and injected and (enc_fc.inject_covariates or dec_fc.inject_covariates):
        problems.append(
            f"deeply_inject_covariates=True with n_layers={n_layers} (VMMSCVI gives the batch and covariates to the "
            "first layer only; the networks are the same only for n_layers=1)"
        )
    if problems:
        raise InputError(
            "the SCVI model's architecture differs from VMMSCVI's: " + "; ".join(problems) + ". Fix: train the SCVI "
            "with the settings VMMSCVI needs (named above), or train VMMSCVI from scratch."
        )
    dropout = next((m.p for m in _layers(enc_fc) if isinstance(m, torch.nn.Dropout)), 0.0)
    return {
        "n_latent": int(vae.n_latent),
        "n_hidden": int(vae.z_encoder.mean_encoder.in_features),
        "n_layers": int(n_layers),
        "gene_likelihood": vae.gene_likelihood,
        "dropout_rate": float(dropout),
        "encode_covariates": bool(vae.encode_covariates),
        "var_activation": "exp",
    }


def _check_same_registry(scvi_model: Any, model: Any) -> None:
    """Genes (names, order), batches and categorical-covariate categories of ``model`` equal ``scvi_model``'s."""
    import numpy as np
    from scvi import REGISTRY_KEYS

    from ..validation import InputError, validate_genes_match

    validate_genes_match(scvi_model.adata.var_names, model.adata.var_names, where="the AnnData given to from_scvi_model")
    theirs, ours = scvi_model.adata_manager.registry, model.adata_manager.registry
    for key, what in ((REGISTRY_KEYS.BATCH_KEY, "batches"), (REGISTRY_KEYS.CAT_COVS_KEY, "categorical covariates")):
        a = theirs["field_registries"].get(key, {}).get("state_registry", {})
        b = ours["field_registries"].get(key, {}).get("state_registry", {})
        a = a.get("categorical_mapping", a.get("mappings"))
        b = b.get("categorical_mapping", b.get("mappings"))
        if isinstance(a, dict):
            same = a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
        else:
            same = (a is None) == (b is None) and (a is None or np.array_equal(np.asarray(a), np.asarray(b)))
        if not same:
            raise InputError(
                f"the {what} of the AnnData given to from_scvi_model differ from the SCVI model's ({_show(b)} vs "
                f"{_show(a)}); the networks have one input column per category. Fix: pass an AnnData with the "
                "SCVI model's categories (e.g. its own, adata=None)."
            )


def _show(mapping: Any) -> str:
    if isinstance(mapping, dict):
        return "{" + ", ".join(f"{k}: {list(map(str, v))[:10]}" for k, v in mapping.items()) + "}"
    return "none" if mapping is None else str(list(map(str, mapping))[:10])


def from_scvi_model(
    cls, scvi_model: Any, adata: Any = None, prior: str = "vmm", n_clusters: int = DEFAULTS.n_clusters,
    seed: int | None = None,
    **kwargs: Any,
) -> Any:
    """A ``cls`` (VMMSCVI) on ``adata`` (default: the SCVI model's) with the SCVI model's networks; see the module
    docstring.  ``kwargs`` go to ``cls(...)`` (``inference``, ``pseudo_input_shift``; the architecture arguments
    come from the SCVI model and are refused here)."""
    from ..validation import InputError

    arch = scvi_architecture(scvi_model)
    clash = {k: kwargs[k] for k in sorted(set(kwargs) & set(arch))}
    differ = {k: v for k, v in clash.items() if v != arch[k]}
    if differ:
        shown = ", ".join(f"{k}={v!r} (the SCVI model's: {arch[k]!r})" for k, v in differ.items())
        raise InputError(
            f"from_scvi_model copies the SCVI model's networks, and {shown} differ(s) from them. Fix: leave "
            f"{sorted(differ)} out (they come from the SCVI model), or train VMMSCVI from scratch with them."
        )
    for k in clash:
        kwargs.pop(k)
    adata = scvi_model.adata if adata is None else adata
    if adata is not scvi_model.adata:
        from ..validation import validate_genes_match

        validate_genes_match(scvi_model.adata.var_names, adata.var_names, where="the AnnData given to from_scvi_model")
    args = scvi_model.adata_manager.registry["setup_args"]
    cls.setup_anndata(adata, **{k: args.get(k) for k in _SETUP_KEYS})
    model = cls(adata, prior=prior, n_clusters=n_clusters, seed=seed, **arch, **kwargs)
    _check_same_registry(scvi_model, model)
    vae, module = scvi_model.module, model.module
    pairs = (
        (module.encoder, vae.z_encoder.encoder),
        (module.mean_encoder, vae.z_encoder.mean_encoder),
        (module.var_encoder, vae.z_encoder.var_encoder),
        (module.decoder.px_decoder, vae.decoder.px_decoder),
        (module.decoder.px_scale_decoder, vae.decoder.px_scale_decoder),
        (module.decoder.px_dropout_decoder, vae.decoder.px_dropout_decoder),
    )
    with torch.no_grad():
        for ours, theirs in pairs:
            state = theirs.state_dict()
            mine = ours.state_dict()
            for key, value in mine.items():
                if key not in state or state[key].shape != value.shape:
                    got = None if key not in state else tuple(state[key].shape)
                    raise InputError(
                        f"cannot copy the SCVI weight {key!r}: shape {got} for VMMSCVI's {tuple(value.shape)} (the "
                        "SCVI model's inputs differ: genes, batches or covariates). Fix: set both up on the same data."
                    )
            ours.load_state_dict({k: state[k] for k in mine})
        module.px_r.copy_(vae.px_r.detach().reshape(-1).to(module.px_r))
    model.scvi_init_ = True
    return model
