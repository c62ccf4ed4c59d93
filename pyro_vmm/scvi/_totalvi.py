r"""``VMMTOTALVI``: totalVI (RNA + surface proteins, CITE-seq) with a VampPrior Mixture prior, driven like
``scvi.model.TOTALVI``.

>>> VMMTOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression", batch_key="batch")
>>> model = VMMTOTALVI(adata, prior="vmm", n_clusters=30)
>>> model.train(seed=0)
>>> adata.obsm["X_vmm"] = model.get_latent_representation()         # E_q[z | x, y, s]
>>> adata.obs["vmm_cluster"] = model.get_cluster_assignments()      # argmax_k q(c = k | E_q[z | x, y, s])
>>> rna, protein = model.get_normalized_expression()                # decoded genes and foreground proteins

The Pyro program is :class:`pyro_vmm.models.totalvi.VMMTOTALVIModule`; training, checkpoints, save/load, latents,
clusters, ELBO and posterior predictive samples (RNA) are the generic :class:`~pyro_vmm.scvi._base.PyroVMMModel`.
This class adds ``TOTALVI``'s AnnData fields, the module's construction (pseudo-inputs: genes and proteins of ``K``
random cells; the background prior from the data) and the decoded expression of genes and proteins.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from numbers import Number
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, ProteinObsmField

from pyro_vmm.models.totalvi import VMMTOTALVIModule, protein_background_prior

from ..defaults import DEFAULTS
from ._base import PyroVMMModel
from ._expression import ExpressionMixin

__all__ = ["VMMTOTALVI"]

PROTEINS = REGISTRY_KEYS.PROTEIN_EXP_KEY


class VMMTOTALVI(PyroVMMModel):
    """totalVI whose latent prior is the VampPrior Mixture (or ``normal``, ``vampprior``, ``gmm``), in Pyro.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (raw RNA and protein counts).
    prior, n_clusters, inference
        The prior on z (``"vmm"``, ``"gmm"``, ``"vampprior"``, ``"normal"``), ``K`` and the EM mode, as ``VMMSCVI``.
    n_latent
        20, as ``scvi.model.TOTALVI`` (two modalities; it is also the setting of the ELBO parity benchmark).
    n_hidden, n_layers_encoder, n_layers_decoder, dropout_rate_encoder, dropout_rate_decoder, gene_likelihood
        As ``scvi.model.TOTALVI`` (defaults equal; ``gene_likelihood`` ``"nb"`` or ``"zinb"``).
    empirical_protein_background_prior
        Start the per-batch background prior from the data (:func:`~pyro_vmm.models.totalvi.protein_background_prior`)
        rather than :math:`\\mathcal N(3, 1)`; ``None``: when there are more than 10 proteins, as ``TOTALVI``.
    seed
        Seeds the network initialisation, the ``K`` pseudo-input cells and the background prior's cell draws.
    **module_kwargs
        Passed to :class:`~pyro_vmm.models.totalvi.VMMTOTALVIModule` (``encode_covariates``,
        ``foreground_activation``).
    """

    _module_cls = VMMTOTALVIModule
    _data_fields = {PROTEINS: "y"}

    def __init__(
        self,
        adata,
        prior: str = "vmm", n_clusters: int = DEFAULTS.n_clusters,
        n_latent: int = 20, n_hidden: int = 256,
        n_layers_encoder: int = 2, n_layers_decoder: int = 1,
        dropout_rate_encoder: float = 0.2, dropout_rate_decoder: float = 0.2,
        gene_likelihood: str = "nb", inference: str = "map-dp",
        empirical_protein_background_prior: bool | None = None,
        seed: int | None = None,
        **module_kwargs,
    ) -> None:
        super().__init__(adata)
        stats = self.summary_stats
        rng = np.random.default_rng(seed if seed is not None else np.random.randint(2**31))
        if empirical_protein_background_prior is None:
            empirical_protein_background_prior = stats.n_proteins > 10
        background = {}
        if empirical_protein_background_prior:
            fields = self._registered_fields()
            batch = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)).ravel()
            mean, scale = protein_background_prior(fields[PROTEINS], batch, stats.n_batch, seed=int(rng.integers(2**31)))
            background = {"protein_background_prior_mean": mean, "protein_background_prior_scale": scale}
        self._init_module(
            stats.n_vars, stats.n_proteins, stats.n_batch, n_latent=n_latent, n_hidden=n_hidden,
            n_layers_encoder=n_layers_encoder, n_layers_decoder=n_layers_decoder,
            dropout_rate_encoder=dropout_rate_encoder, dropout_rate_decoder=dropout_rate_decoder,
            gene_likelihood=gene_likelihood, prior=prior, n_clusters=n_clusters, inference=inference, seed=seed,
            rng=rng, pseudo_fields=(PROTEINS,), **background, **module_kwargs,
        )
        self._model_summary_string = (
            f"VMMTOTALVI model: prior={prior}, n_clusters={self.module.prior.n_components}, n_latent={n_latent}, "
            f"n_hidden={n_hidden}, gene_likelihood={gene_likelihood}, proteins={stats.n_proteins}, "
            f"empirical_protein_background_prior={empirical_protein_background_prior}, inference={inference}"
        )
        self.init_params_ = self._get_init_params(locals())

    @property
    def protein_names(self) -> np.ndarray:
        """The registered protein names (columns of the protein matrix)."""
        return np.asarray(self.adata_manager.get_state_registry(PROTEINS).column_names)

    # -------------------------------------------------------------------------------------------- data setup
    @classmethod
    def setup_anndata(
        cls,
        adata,
        protein_expression_obsm_key: str,
        protein_names_uns_key: str | None = None,
        batch_key: str | None = None,
        layer: str | None = None,
        **kwargs,
    ) -> None:
        """Register raw RNA counts (``adata.X`` or ``adata.layers[layer]``), raw protein counts
        ``adata.obsm[protein_expression_obsm_key]`` (a DataFrame, or an array with names in
        ``adata.uns[protein_names_uns_key]``) and the batch, as ``scvi.model.TOTALVI.setup_anndata``.  Proteins are
        not masked per batch (``TOTALVI`` drops a protein from the likelihood of a batch where it is all zero; here
        that gives a warning): give the proteins every batch measured."""
        setup_method_args = cls._get_setup_method_args(**locals())
        from pyro_vmm.validation import InputError, InputWarning, validate_anndata, validate_counts

        validate_anndata(adata, layer=layer, batch_key=batch_key)
        if protein_expression_obsm_key not in adata.obsm:
            raise InputError(
                f"protein_expression_obsm_key={protein_expression_obsm_key!r} is not in adata.obsm; available keys: "
                f"{sorted(map(str, adata.obsm.keys()))}. Fix: pass the key of the cells x proteins count matrix."
            )
        proteins = adata.obsm[protein_expression_obsm_key]
        values = proteins.to_numpy() if isinstance(proteins, pd.DataFrame) else proteins
        validate_counts(values, where=f"adata.obsm[{protein_expression_obsm_key!r}]")
        batch_field = CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key)
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            batch_field,
            ProteinObsmField(  # the batch mask as TOTALVI's (scvi-tools' transfer needs it); only used to warn
                PROTEINS, protein_expression_obsm_key, use_batch_mask=True, batch_field=batch_field,
                colnames_uns_key=protein_names_uns_key, is_count_data=True,
            ),
        ]
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        mask = adata_manager.get_state_registry(PROTEINS).get(ProteinObsmField.PROTEIN_BATCH_MASK) or {}
        absent = {str(b): int(np.size(m) - np.count_nonzero(m)) for b, m in mask.items() if not np.all(m)}
        if absent:
            warnings.warn(
                f"proteins with no counts in a whole batch ({absent} per batch code) are modelled as measured zeros. "
                "Fix: keep only the proteins every batch measured.", InputWarning, stacklevel=2,
            )
        cls.register_manager(adata_manager)

    # -------------------------------------------------------------------------------------------- expression
    @staticmethod
    def _selection(names: pd.Index, wanted: Sequence[str] | None, what: str) -> np.ndarray:
        """Boolean mask of ``wanted`` among ``names`` (all when ``None``); unknown names are refused."""
        if wanted is None:
            return np.ones(len(names), dtype=bool)
        missing = [n for n in map(str, wanted) if n not in names]
        if missing:
            raise ValueError(f"{len(missing)} name(s) of {what} are not in the model (first: {missing[:3]})")
        return names.isin([str(n) for n in wanted])

    def get_normalized_expression(
        self,
        adata=None, indices: Sequence[int] | None = None,
        n_samples: int = 1,
        transform_batch: str | Number | Sequence[str | Number | None] | None = None,
        gene_list: Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        sample_protein_mixing: bool = False,
        include_protein_background: bool = False,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool = False,
    ) -> tuple[pd.DataFrame, pd.DataFrame] | tuple[np.ndarray, np.ndarray]:
        r"""Decoded RNA :math:`\rho_n \cdot` ``library_size`` and protein expression (the foreground mean
        :math:`(1 - \pi_{nt})\alpha_{nt}\beta_{nt}`, plus :math:`\pi_{nt}\beta_{nt}` with
        ``include_protein_background``), as ``scvi.model.TOTALVI.get_normalized_expression``; see
        :meth:`~pyro_vmm.models.totalvi.VMMTOTALVIModule.normalized_expression`.

        ``transform_batch``: ``None`` each cell's own batch, a batch name, or a list of them (the average over those
        batches); ``library_size``: a number (1: frequencies) or ``"latent"`` (the observed library size);
        ``n_samples`` draws per cell, averaged with ``return_mean``.  Returns ``(rna, protein)``: DataFrames
        ``(n_cells, n_genes)`` and ``(n_cells, n_proteins)`` (cell index; gene / protein columns), or arrays with
        ``return_numpy``, ``(n_samples, n_cells, .)`` when ``n_samples > 1`` and not ``return_mean``."""
        if not (library_size == "latent" or (isinstance(library_size, Number) and library_size > 0)):
            raise ValueError(f"library_size must be a positive number or 'latent', got {library_size!r}")
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        indices = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        indices = np.flatnonzero(indices) if indices.dtype == bool else indices
        codes = tuple(ExpressionMixin._batch_codes(self, adata, transform_batch))
        genes = self._selection(pd.Index(adata.var_names.astype(str)), gene_list, "gene_list")
        proteins = self._selection(pd.Index(self.protein_names.astype(str)), protein_list, "protein_list")
        rna, pro = [], []
        with torch.inference_mode():
            for x, b, c in self._minibatch_args(adata, indices, batch_size):
                rho, protein = self.module.normalized_expression(
                    x, b, n_samples, codes, include_protein_background=include_protein_background,
                    sample_protein_mixing=sample_protein_mixing, **c,
                )
                scale = x.sum(-1, keepdim=True) if library_size == "latent" else float(library_size)
                rna.append((rho * scale).cpu().numpy()[..., genes])
                pro.append(protein.cpu().numpy()[..., proteins])
        out = [np.concatenate(parts, axis=1) for parts in (rna, pro)]  # (S, N, .)
        if n_samples > 1 and not return_mean:
            return out[0], out[1]
        out = [o.mean(0) for o in out]
        if return_numpy:
            return out[0], out[1]
        cells = adata.obs_names[indices]
        return (pd.DataFrame(out[0], index=cells, columns=adata.var_names[genes]),
                pd.DataFrame(out[1], index=cells, columns=self.protein_names[proteins]))
