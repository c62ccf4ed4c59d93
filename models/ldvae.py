r"""LDVAE (Svensson et al. 2020): scVI with a *linear* decoder, and a pluggable latent prior, as a Pyro program.

Generative story for cell :math:`n` with counts :math:`x_n \in \mathbb N^G` measured in batch :math:`s_n`:

.. math::

    z_n &\sim p(z)                        && \text{the prior: normal | vampprior | gmm | vmm} \\
    \ell_n &= \textstyle\sum_g x_{ng}      && \text{observed library size (not modelled)} \\
    \rho_n &= \operatorname{softmax}\big(W z_n + b + \beta_{s_n}\big)
           && W \in \mathbb R^{G \times D} \text{ loadings},\ b \text{ gene intercepts},\ \beta_s \text{ batch offsets} \\
    x_{ng} &\sim \mathrm{NB}(\ell_n \rho_{ng}, \theta_g)
           && \theta_g > 0 \text{ per-gene inverse dispersion (or ZINB, gate logits } H z_n + c + \gamma_{s_n}).

The decoder is one linear map of ``concat(z, onehot(s))``, as scvi-tools' ``LinearDecoderSCVI`` without batch norm
(so the loadings are :math:`W` itself, not rescaled by batch-norm statistics; scvi-tools' decoder has no intercept
:math:`b` and drops the batch columns when there is one batch).  Each latent dimension :math:`d` is a gene program:
a unit step along :math:`z_d` multiplies gene :math:`g`'s expression odds by :math:`e^{W_{gd}}`.

Everything else is :class:`~pyro_vmm.models.scvi.VMMSCVIModule`'s, reused by inheritance: ``model`` / ``guide``
(the latent at site ``"z"``, log-densities scaled by :math:`1/B`), the encoder :math:`q_\phi(z_n \mid x_n)`, the
pseudo-inputs :math:`u_k` and :math:`q_\phi(\mu_k \mid u_k)` of the VampPrior / VMM, the count likelihood
:class:`~pyro_vmm.models.scvi.GeneCounts` (fed the linear logits :math:`W z + b + \beta_s`), and the inference
helpers (latents, cluster probabilities, importance weights, posterior predictive samples).  This file only swaps
the decoder: :meth:`LDVAEModule.likelihood` and :meth:`LDVAEModule.normalized_expression`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from pyro_vmm.models.scvi import GeneCounts, VMMSCVIModule
from pyro_vmm.utils import eval_mode

__all__ = ["LDVAEModule", "LinearDecoder"]


class LinearDecoder(nn.Module):
    r""":math:`f(z, s) = W z + b + \beta_s`, shape ``(B, G)``: one linear layer on ``concat(z, onehot(s))`` (the batch
    columns only when ``n_batch > 1``)."""

    def __init__(self, n_latent: int, n_output: int, n_batch: int) -> None:
        super().__init__()
        self.n_batch = int(n_batch)
        self.linear = nn.Linear(n_latent + (self.n_batch if self.n_batch > 1 else 0), n_output)

    def forward(self, z: Tensor, batch_index: Tensor) -> Tensor:
        if self.n_batch > 1:
            onehot = nn.functional.one_hot(batch_index.reshape(-1).long(), self.n_batch).to(z.dtype)
            z = torch.cat([z, onehot], dim=-1)
        return self.linear(z)

    @property
    def loadings(self) -> Tensor:
        """:math:`W`, ``(G, D)``: the weights of ``z`` (the batch columns left out)."""
        return self.linear.weight[:, : self.linear.in_features - (self.n_batch if self.n_batch > 1 else 0)]


class LDVAEModule(VMMSCVIModule):
    """LDVAE as a Pyro program with a pluggable latent prior (see the module docstring for the math).

    Takes :class:`~pyro_vmm.models.scvi.VMMSCVIModule`'s arguments (``n_layers``, ``n_hidden``, ``dropout_rate``
    shape the encoder only); ``gene_likelihood`` defaults to ``"nb"`` as ``scvi.model.LinearSCVI``.
    """

    def __init__(self, n_input: int, n_batch: int, gene_likelihood: str = "nb", **kwargs) -> None:
        super().__init__(n_input, n_batch, gene_likelihood=gene_likelihood, **kwargs)
        if self.n_continuous_cov or self.n_cats_per_cov:
            raise ValueError("LDVAEModule takes the batch as its only covariate")
        del self.decoder  # scVI's non-linear decoder, replaced by the linear maps below
        self.decoder = LinearDecoder(self.n_latent, self.n_input, self.n_batch)
        zinb = gene_likelihood == "zinb"
        self.gate_decoder = LinearDecoder(self.n_latent, self.n_input, self.n_batch) if zinb else None

    def decode_logits(
        self, z: Tensor, batch_index: Tensor, cat_covs: None = None, cont_covs: None = None
    ) -> tuple[Tensor, Tensor | None]:
        r"""The linear maps :math:`W z + b + \beta_s` (pre-softmax :math:`\log\rho`) and, for the ZINB, the gate
        logits: :math:`p(x \mid z, \ell, s) = \prod_g \mathrm{NB}(x_g \mid \ell \operatorname{softmax}(W z + b +
        \beta_s)_g, \theta_g)` (or the ZINB) through :meth:`VMMSCVIModule.likelihood`."""
        gate = self.gate_decoder(z, batch_index) if self.gate_decoder is not None else None
        return self.decoder(z, batch_index), gate

    @torch.no_grad()
    def normalized_expression(
        self, x: Tensor, batch_index: Tensor, n_samples: int = 1, batch_codes: tuple[int | None, ...] = (None,),
        **covs: Tensor | None,
    ) -> Tensor:
        r""":math:`\rho = \operatorname{softmax}(W z + b + \beta_{s'})`, :math:`z \sim q(z \mid x)`, averaged over the
        batches :math:`s'` in ``batch_codes`` (``None``: the cell's own); ``(n_samples, B, G)``, rows sum to 1."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        b = x.shape[0]
        with eval_mode(self):
            z = self._encode(x, batch_index, covs).sample((n_samples,)).reshape(n_samples * b, -1)
            own = batch_index.reshape(-1).repeat(n_samples)
            rho = sum(
                torch.softmax(self.decoder(z, own if code is None else torch.full_like(own, int(code))), -1)
                for code in batch_codes
            )
        return (rho / len(batch_codes)).reshape(n_samples, b, -1)

    def get_loadings(self) -> np.ndarray:
        """The loadings :math:`W`, ``(G, D)`` (genes x latent dimensions), as ``scvi.module.LDVAE.get_loadings``."""
        return self.decoder.loadings.detach().cpu().numpy()
