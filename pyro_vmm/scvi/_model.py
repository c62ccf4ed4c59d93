r"""``VMMSCVI``: scVI with a VampPrior Mixture prior, driven like ``scvi.model.SCVI``.

>>> VMMSCVI.setup_anndata(adata, batch_key="batch")
>>> model = VMMSCVI(adata, prior="vmm", n_clusters=30)
>>> model.train(seed=0)
>>> adata.obsm["X_vmm"] = model.get_latent_representation()         # E_q[z | x]
>>> adata.obs["vmm_cluster"] = model.get_cluster_assignments()      # argmax_k q(c = k | E_q[z | x])
>>> markers = model.cluster_markers()                               # marker genes of every cluster (DE)

The Pyro program is :class:`pyro_vmm.models.scvi.VMMSCVIModule`; everything else (training, checkpoints, save/load,
latents, clusters, query mapping) is the generic :class:`~pyro_vmm.scvi._base.PyroVMMModel`.  This class adds the
AnnData fields of ``scvi.model.SCVI``, the module's construction, decoded expression / DE
(:class:`~pyro_vmm.scvi._expression.ExpressionMixin`) and :meth:`VMMSCVI.from_scvi_model`.
"""

from __future__ import annotations

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    LayerField,
    NumericalJointObsField,
    NumericalObsField,
)

from pyro_vmm.models.scvi import COVARIATE_KEYS, VMMSCVIModule

from ..defaults import DEFAULTS
from ._base import PyroVMMModel
from ._expression import ExpressionMixin

__all__ = ["VMMSCVI"]


class VMMSCVI(ExpressionMixin, PyroVMMModel):
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
        Give the batch to the encoder as well as the decoder (default ``True``, the reference code's encoder;
        ``scvi.model.SCVI`` leaves it out; the reason is in :mod:`pyro_vmm.defaults`).
    **module_kwargs
        Passed to :class:`~pyro_vmm.models.scvi.VMMSCVIModule` (``var_activation``, ``pseudo_input_shift``).
    """

    _module_cls = VMMSCVIModule
    _data_fields = COVARIATE_KEYS

    def __init__(
        self,
        adata,
        prior: str = "vmm", n_clusters: int = DEFAULTS.n_clusters,
        n_latent: int = 10, n_hidden: int = 128, n_layers: int = 1,
        gene_likelihood: str = "zinb", dropout_rate: float = 0.1, inference: str = "map-dp",
        seed: int | None = None,
        encode_covariates: bool = DEFAULTS.encode_covariates,
        **module_kwargs,
    ) -> None:
        super().__init__(adata)
        self._init_module(
            self.summary_stats.n_vars, self.summary_stats.n_batch, n_latent=n_latent, n_hidden=n_hidden,
            n_layers=n_layers, dropout_rate=dropout_rate, gene_likelihood=gene_likelihood, prior=prior,
            n_clusters=n_clusters, inference=inference, seed=seed, encode_covariates=encode_covariates,
            **self._covariate_sizes(), **module_kwargs,
        )
        self._model_summary_string = (
            f"VMMSCVI model: prior={prior}, n_clusters={self.module.prior.n_components}, n_latent={n_latent}, "
            f"n_hidden={n_hidden}, n_layers={n_layers}, gene_likelihood={gene_likelihood}, "
            f"dropout_rate={dropout_rate}, inference={inference}"
        )
        self.init_params_ = self._get_init_params(locals())

    def _covariate_sizes(self) -> dict:
        """The covariate arguments of :class:`~pyro_vmm.models.scvi.VMMSCVIModule`: each categorical covariate's
        number of categories, the number of continuous covariates and their mean over the cells (the
        pseudo-inputs' continuous part)."""
        cat_state = self.adata_manager.registry["field_registries"].get(REGISTRY_KEYS.CAT_COVS_KEY, {})
        n_cats_per_cov = list(cat_state.get("state_registry", {}).get("n_cats_per_key", []))
        cont = self._registered_fields().get(REGISTRY_KEYS.CONT_COVS_KEY)
        sizes = {}
        if n_cats_per_cov:
            sizes["n_cats_per_cov"] = n_cats_per_cov
        if cont is not None:
            sizes["n_continuous_cov"] = cont.shape[1]
            sizes["cont_covs_mean"] = torch.as_tensor(cont.mean(axis=0, dtype=np.float64))
        return sizes

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

    @classmethod
    def from_scvi_model(
        cls, scvi_model, adata=None, prior: str = "vmm", n_clusters: int = DEFAULTS.n_clusters,
        seed: int | None = None, **kwargs,
    ) -> VMMSCVI:
        """A VMMSCVI with the encoder, decoder and dispersion of a trained ``scvi.model.SCVI`` (as scvi-tools'
        ``SCANVI.from_scvi_model``), on ``adata`` (default: the SCVI model's AnnData) registered with the SCVI model's
        setup arguments; the prior's pseudo-inputs are random cells.  Before training its posterior mean is SCVI's
        ``get_latent_representation``; :meth:`train` then fits the prior and fine-tunes.  An SCVI whose architecture,
        genes, batches or covariate categories differ is refused with an error naming the difference.  See
        :mod:`pyro_vmm.scvi._from_scvi`."""
        from ._from_scvi import from_scvi_model

        return from_scvi_model(cls, scvi_model, adata=adata, prior=prior, n_clusters=n_clusters, seed=seed, **kwargs)
