r"""Per-cell outputs of a :class:`~pyro_vmm.scvi._base.PyroVMMModel`: latents, clusters, ELBO, marginal likelihood,
posterior predictive samples.

Minibatches come from the registered AnnData (in memory, or streamed from a backed file) in the order of
``indices``; every method calls the module as ``f(x, batch_index, **fields)``, ``fields`` the model's
``_data_fields`` (networks in eval mode, no gradient).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from scipy import sparse as sp
from scvi import REGISTRY_KEYS, settings

from ..defaults import assign_to, min_cluster_size
from ..infer import AlternatingSVI
from ..merging import cluster_components
from ._backed import BackedMatrix
from ._data import MAX_DENSE_BYTES, CountsDataset, MinibatchSampler, registered_arrays

__all__ = ["LatentMixin"]


class LatentMixin:
    """The per-cell outputs of a ``PyroVMMModel`` (see the module docstring)."""

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
        covs = self._registered_fields(manager, indices)
        if isinstance(counts, BackedMatrix):  # read from the file minibatch by minibatch (rows None: all, in order)
            ds = CountsDataset(counts, batch, rows=indices, covariates=covs)
        else:
            max_bytes = 0 if sp.issparse(counts) else MAX_DENSE_BYTES
            ds = CountsDataset(counts, batch, max_dense_bytes=max_bytes, covariates=covs)
        device = self.module.device
        for idx in MinibatchSampler(len(ds), batch_size or settings.batch_size, shuffle=False):
            item = ds[idx]
            kwargs = {kw: item[key].to(device) for key, kw in self._data_fields.items() if item.get(key) is not None}
            yield item[REGISTRY_KEYS.X_KEY].to(device), item[REGISTRY_KEYS.BATCH_KEY].to(device), kwargs

    def _collect(self, fn, adata, indices, batch_size) -> np.ndarray:
        """``fn(x, batch_index, **covs)`` over the minibatches, concatenated along the cells."""
        self._check_if_trained(warn=False)
        with torch.inference_mode():
            parts = [fn(x, b, **c).cpu().numpy() for x, b, c in self._minibatch_args(adata, indices, batch_size)]
        return np.concatenate(parts, axis=0)

    def get_latent_representation(
        self,
        adata=None, indices: Sequence[int] | None = None,
        give_mean: bool = True, mc_samples: int = 5000,
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
        adata=None, indices: Sequence[int] | None = None,
        give_mean: bool = True, mc_samples: int = 100,
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
        """After training, fix the clusters (``cluster_of_component_``, the cluster of each of the ``K`` components,
        ``-1`` for one that is not reported) in two label-free steps over the model's cells
        (:func:`~pyro_vmm.merging.cluster_components`, the rule of the merge moves during training):

        1. components that are the most probable one for fewer than :func:`~pyro_vmm.defaults.min_cluster_size`
           cells are dropped, their cells going to their most probable remaining component
           (:func:`~pyro_vmm.defaults.final_components`);
        2. the kept components are merged into clusters along the modality-ordered path of largest ICL
           (:func:`~pyro_vmm.merging.merge_components`): several Gaussian components that cover one blob of the
           latent space are one cluster.

        A query model keeps its reference's clusters."""
        if self.module.prior.n_components < 2 or self.module.frozen_prior:
            return
        self.cluster_of_component_ = self._component_clusters()

    def _component_clusters(self) -> np.ndarray:
        """The cluster of each of the ``K`` components (``-1``: not reported) by
        :func:`~pyro_vmm.merging.cluster_components`, on the model's cells as the model is now."""
        latent, probs = self._means_and_cluster_probs()
        return cluster_components(latent, probs, min_cluster_size(probs.shape[0]))

    def _means_and_cluster_probs(self) -> tuple[np.ndarray, np.ndarray]:
        r"""The latent means :math:`E_q[z \mid x]` (N, D) and :math:`q(c \mid z)` at them (N, K) of the model's cells,
        one encoder pass per minibatch and without the trained-model check (the merge moves call it in training)."""
        prior = self.module.prior
        encoder = getattr(self.module, "pseudo_posterior", None) if prior.uses_encoder else None
        means, probs = [], []
        with torch.inference_mode():
            for x, b, c in self._minibatch_args():
                z = self.module.latent_mean(x, b, **c)
                means.append(z.cpu().numpy())
                probs.append(prior.cluster_probs(z, encoder).cpu().numpy())
        return np.concatenate(means, axis=0), np.concatenate(probs, axis=0)

    def clusters_from_probabilities(self, probs: np.ndarray, all_components: bool = False) -> np.ndarray:
        """Clusters from :meth:`get_cluster_probabilities`: the most probable of the reported components, mapped to
        its cluster (``cluster_of_component_``, clusters numbered ``0, 1, ...`` by size in the training data);
        ``all_components=True`` (or a model trained before clusters were fixed): the argmax over all ``K``
        components, as component indices."""
        cluster_of = getattr(self, "cluster_of_component_", None)
        if all_components or cluster_of is None:
            return assign_to(probs)
        return cluster_of[assign_to(probs, np.flatnonzero(cluster_of >= 0))]

    def get_cluster_assignments(
        self,
        adata=None, indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        all_components: bool = False,
    ) -> np.ndarray:
        """The cluster of each cell, shape ``(n_cells,)``: :math:`\\arg\\max_k q(c = k \\mid z)` at the posterior mean
        z over the reported components, mapped to their clusters (see :meth:`_set_cluster_components`: near-empty
        components folded into their neighbours, components that cover one blob merged), numbered ``0, 1, ...`` by
        size.  ``all_components=True``: the argmax over all ``K`` components, as component indices (columns of
        :meth:`get_cluster_probabilities`)."""
        probs = self.get_cluster_probabilities(adata, indices, batch_size=batch_size)
        return self.clusters_from_probabilities(probs, all_components)

    def n_utilized_clusters(self, adata=None) -> int:
        """Number of distinct cluster assignments over the cells of ``adata``."""
        return int(np.unique(self.get_cluster_assignments(adata)).size)

    def get_elbo(
        self,
        adata=None, indices: Sequence[int] | None = None,
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
        adata=None, indices: Sequence[int] | None = None,
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
        adata=None, indices: Sequence[int] | None = None,
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
        adata=None, indices: Sequence[int] | None = None,
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
