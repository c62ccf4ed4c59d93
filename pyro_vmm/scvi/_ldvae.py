"""``VMMLDVAE``: the LDVAE of ``models/ldvae.py`` as a scvi-tools model, the whole glue of a new family on the base.

Training, save/load, latents and clusters come from :class:`~pyro_vmm.scvi._base.PyroVMMModel`, decoded expression
and DE from :class:`~pyro_vmm.scvi._expression.ExpressionMixin`; this file adds the AnnData fields, the module's
construction and the loadings (notebook 03 shows it as the recipe for extending another model).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField

from pyro_vmm.models.ldvae import LDVAEModule

from ..defaults import DEFAULTS
from ._base import PyroVMMModel
from ._expression import ExpressionMixin

__all__ = ["VMMLDVAE"]


class VMMLDVAE(ExpressionMixin, PyroVMMModel):
    """LDVAE (linear decoder, NB counts) with a VMM (or ``normal``, ``vampprior``, ``gmm``) prior on z."""

    _module_cls = LDVAEModule
    _data_fields = {}  # counts and batch only

    @classmethod
    def setup_anndata(cls, adata, layer: str | None = None, batch_key: str | None = None, **kwargs) -> None:
        """Register raw counts (``adata.X`` or ``adata.layers[layer]``) and the batch (``adata.obs[batch_key]``)."""
        setup_method_args = cls._get_setup_method_args(**locals())
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    def __init__(self, adata, prior: str = "vmm", n_clusters: int = DEFAULTS.n_clusters, n_latent: int = 10,
                 seed: int | None = None, **module_kwargs) -> None:
        """``module_kwargs``: :class:`~pyro_vmm.models.ldvae.LDVAEModule` arguments (``n_hidden``, ``n_layers``,
        ``dropout_rate``, ``gene_likelihood``, ``inference``, ...)."""
        super().__init__(adata)
        self._init_module(self.summary_stats.n_vars, self.summary_stats.n_batch, n_latent=n_latent, prior=prior,
                          n_clusters=n_clusters, seed=seed, **module_kwargs)
        self._model_summary_string = f"VMMLDVAE: prior={prior}, n_clusters={n_clusters}, n_latent={n_latent}"
        self.init_params_ = self._get_init_params(locals())

    def get_loadings(self) -> pd.DataFrame:
        """Genes x latent dimensions: the decoder's weights :math:`W` (as ``scvi.model.LinearSCVI.get_loadings``)."""
        loadings = self.module.get_loadings()
        cols = [f"Z_{i}" for i in range(loadings.shape[1])]
        return pd.DataFrame(np.asarray(loadings), index=self.adata.var_names, columns=cols)
