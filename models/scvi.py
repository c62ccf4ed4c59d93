r"""scVI with a VampPrior-Mixture (or N(0,I), VampPrior, GMM) latent prior, as a Pyro model/guide pair.

Generative story for cell :math:`n` with counts :math:`x_n \in \mathbb N^G` measured in batch :math:`s_n`
(Stirn & Knowles 2024, section 4; Lopez et al. 2018):

.. math::

    z_n &\sim p(z)                                   && \text{the prior: normal | vampprior | gmm | vmm} \\
    \ell_n &= \textstyle\sum_g x_{ng}                  && \text{observed library size (not modelled)} \\
    \rho_n &= \operatorname{softmax}\big(f_\theta(z_n, s_n)\big), \quad h_n = f^{\mathrm{zi}}_\theta(z_n, s_n)
           && \text{decoder: expression frequencies and zero-inflation logits} \\
    \mu_{ng} &= \ell_n \rho_{ng} \\
    x_{ng} &\sim \mathrm{ZINB}\big(\mu_{ng}, \theta_g, \operatorname{sigmoid}(h_{ng})\big)
           \ \text{or}\ \mathrm{NB}(\mu_{ng}, \theta_g)
           && \theta_g > 0 \text{ per-gene inverse dispersion}.

The NB is Pyro's failure-count parameterisation ``NegativeBinomial(total_count=theta, logits=log(mu) - log(theta))``
(mean :math:`\mu`, variance :math:`\mu + \mu^2/\theta`), with ``eps = 1e-8`` inside the logs as in scvi-tools; the
ZINB is ``ZeroInflatedDistribution(NB, gate_logits=h)``, i.e. ``dist.ZeroInflatedNegativeBinomial``.  The NB is
:class:`NegativeBinomialCounts`, a Pyro ``NegativeBinomial`` whose log-density evaluates its ``lgamma`` terms on the
non-zero counts only (same values and gradients, a large saving on sparse scRNA-seq counts); the ZINB is
:class:`ZeroInflatedNBCounts`, whose log-density and its gradient are one hand-written autograd function.

Amortised posterior (guide): :math:`q_\phi(z_n \mid x_n, s_n) = \mathcal N(m_n, \operatorname{diag} \sigma_n^2)`
from ``concat(log1p(x_n), onehot(s_n))`` through ``n_layers x [Linear -> BatchNorm(momentum 0.01, eps 1e-3) -> ReLU
-> Dropout]``; the variance is :math:`\sigma^2 = \exp(\cdot) + 10^{-4}` (scvi-tools' default, ``var_activation=
"exp"``) or :math:`\sigma = \operatorname{softplus}(\cdot)` (the VMM authors' TensorFlow code, ``"softplus"``).
The decoder is scvi-tools' :class:`~scvi.nn.DecoderSCVI` on ``concat(z, onehot(s))`` without deep covariate injection,
i.e. the same networks as ``scvi.model.SCVI(..., encode_covariates=True, deeply_inject_covariates=False)``.

Pseudo-inputs (``vmm``, ``vampprior``): :math:`u_k = (\tilde x_k, \tilde s_k)` with counts
:math:`\tilde x_k = \operatorname{softplus}(v_k) - c` (``c = 0`` by default; ``c = 1`` is the reference code's
shifted softplus) and a soft batch vector :math:`\tilde s_k = \operatorname{softmax}(w_k)` started uniform.  They pass
through the same encoder (in eval mode) to give :math:`q_\phi(\mu_k \mid u_k)`.  The raw :math:`(v_k, w_k)` are the
prior's ``pseudo_inputs`` parameter, shape ``(K, G + n_batch)`` (``(K, G)`` for single-batch data).

Both ``model`` and ``guide`` scale log-densities by :math:`1/B`, so ``TraceMeanField_ELBO`` returns the batch mean of
the per-cell negative ELBO (summed over genes), the same convention as scvi-tools' ``elbo_train``/``elbo_validation``.
All parameters live in this ``nn.Module`` (no global Pyro param store).
"""

from __future__ import annotations

import math
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from scvi import REGISTRY_KEYS
from scvi.module.base import PyroBaseModuleClass
from scvi.nn import DecoderSCVI, FCLayers
from torch import Tensor, nn

from pyro_vmm.priors import build_prior
from pyro_vmm.utils import eval_mode, inverse_softplus

__all__ = [
    "NegativeBinomialCounts",
    "VMMSCVIModule",
    "ZeroInflatedNBCounts",
    "counts_to_pseudo_inputs",
    "inverse_softplus",
]

#: inside the logs of the NB/ZINB logits, as scvi-tools' ``log_nb_positive``
NB_EPS = 1e-8
#: floor on the variance of q(z|x) for ``var_activation="exp"`` (scvi-tools' ``var_eps``)
VAR_EPS = 1e-4
#: pseudo-input counts are clamped to at least this before the inverse softplus
PSEUDO_COUNT_FLOOR = 1e-3

GeneLikelihood = Literal["zinb", "nb"]
VarActivation = Literal["exp", "softplus"]


class NegativeBinomialCounts(dist.NegativeBinomial):
    r"""Pyro's ``NegativeBinomial(total_count=theta, logits=eta)`` with a log-density evaluated sparsely.

    .. math:: \log p(x) = x\eta - (\theta + x)\operatorname{softplus}(\eta)
              + \big[\log\Gamma(\theta + x) - \log\Gamma(\theta) - \log\Gamma(x + 1)\big]_{x > 0}

    equals torch's :math:`\theta\log\sigma(-\eta) + x\log\sigma(\eta) + \log\binom{x+\theta-1}{x}`; the
    bracket vanishes at :math:`x = 0`, so the ``lgamma`` terms (and their ``digamma`` gradients) are computed on the
    non-zero counts only (about 6% of a 2000-HVG PBMC matrix).  Sampling, ``expand`` and ``to_event`` are Pyro's."""

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        theta, eta, value = torch.broadcast_tensors(self.total_count, self.logits, value)
        dense = value * eta - (theta + value) * F.softplus(eta)
        idx, _, _, lgamma_terms = _nonzero_lgamma_terms(theta, value)
        return dense + torch.zeros_like(dense).index_put(idx, lgamma_terms)


def _nonzero_lgamma_terms(theta: Tensor, x: Tensor) -> tuple[tuple[Tensor, ...], Tensor, Tensor, Tensor]:
    r"""Indices of the non-zero counts (one ``nonzero()`` pass; the gathers work on broadcast views), :math:`\theta`
    and :math:`\theta + x` there, and :math:`\log\Gamma(\theta + x) - \log\Gamma(\theta) - \log\Gamma(x + 1)`
    there (it vanishes at :math:`x = 0`)."""
    idx = torch.nonzero(x > 0, as_tuple=True)
    x_nz, theta_nz = x[idx], theta[idx]
    theta_x = theta_nz + x_nz
    return idx, theta_nz, theta_x, torch.lgamma(theta_x) - torch.lgamma(theta_nz) - torch.lgamma(x_nz + 1.0)


class _ZINBLogProb(torch.autograd.Function):
    r"""Element-wise ZINB log-density with a hand-written backward (about 10 element-wise passes each way instead of
    ~30 autograd nodes); inputs ``(eta, theta, h, x)`` already broadcast.  With :math:`A = x\eta - (\theta + x)
    \operatorname{softplus}(\eta)` (the NB log-density without its ``lgamma`` terms) and :math:`z = [x = 0]`:

    .. math:: \log p = A - \operatorname{softplus}(h) + z\,\operatorname{softplus}(h - A)
              + (1 - z)\,[\log\Gamma(\theta + x) - \log\Gamma(\theta) - \log\Gamma(x + 1)]

    (at :math:`x = 0`: :math:`\log(\sigma(h) + \sigma(-h)\,e^{A})`; else :math:`\log\sigma(-h) + \log
    \mathrm{NB}(x)`).  Gradients, with :math:`r = z\,\sigma(h - A)`: :math:`\partial_h = r - \sigma(h)`,
    :math:`\partial_A = 1 - r`, :math:`\partial_\eta = \partial_A (x - (\theta + x)\sigma(\eta))`,
    :math:`\partial_\theta = -\partial_A \operatorname{softplus}(\eta) + (1 - z)[\psi(\theta + x) -
    \psi(\theta)]`; the ``lgamma``/``digamma`` terms run on the non-zero counts only."""

    @staticmethod
    def forward(ctx, eta: Tensor, theta: Tensor, h: Tensor, x: Tensor) -> Tensor:
        sp_eta = F.softplus(eta)
        a = x * eta - (theta + x) * sp_eta
        zero = x == 0
        h_minus_a = h - a
        out = (a - F.softplus(h)) + torch.where(zero, F.softplus(h_minus_a), 0.0)
        idx, theta_nz, theta_x, lgamma_terms = _nonzero_lgamma_terms(theta, x)
        out.index_put_(idx, out[idx] + lgamma_terms)  # unique indices: a gather and a scatter, no accumulate pass
        ctx.save_for_backward(eta, theta, h, x, sp_eta, h_minus_a, zero, theta_nz, theta_x)
        ctx.nonzero = idx
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        eta, theta, h, x, sp_eta, h_minus_a, zero, theta_nz, theta_x = ctx.saved_tensors
        r = torch.where(zero, torch.sigmoid(h_minus_a), 0.0)
        d_a = (1.0 - r) * grad
        d_h = (r - torch.sigmoid(h)) * grad
        d_eta = d_a * (x - (theta + x) * torch.sigmoid(eta))
        idx = ctx.nonzero  # the forward's gathers are reused: theta and theta + x at the non-zero counts
        d_theta = -d_a * sp_eta
        d_theta.index_put_(idx, d_theta[idx] + (torch.digamma(theta_x) - torch.digamma(theta_nz)) * grad[idx])
        return d_eta, d_theta, d_h, None


class ZeroInflatedNBCounts(dist.ZeroInflatedDistribution):
    r"""Pyro's ``ZeroInflatedDistribution(NegativeBinomial(theta, logits=eta), gate_logits=h)`` (the same
    distribution as ``dist.ZeroInflatedNegativeBinomial``) whose ``log_prob`` is :class:`_ZINBLogProb`: same values
    and gradients, fewer passes over the (B, G) counts (a few per cent of a VI step at batch 128 on CPU).
    Sampling, ``expand`` and ``to_event`` are Pyro's."""

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        base = self.base_dist
        eta, theta, h, value = torch.broadcast_tensors(base.logits, base.total_count, self.gate_logits, value)
        return _ZINBLogProb.apply(eta, theta, h, value)


def counts_to_pseudo_inputs(counts: Tensor, n_batch: int, shift: float = 0.0) -> Tensor:
    r"""Raw pseudo-input parameters :math:`(v_k, w_k)` from K cells' counts ``(K, G)``.

    :math:`v_k = \operatorname{softplus}^{-1}(\max(x_k + c, \epsilon))` so that
    :math:`\operatorname{softplus}(v_k) - c = x_k` (zeros become :math:`\epsilon - c` when ``c = 0``),
    and :math:`w_k = 0` (uniform batch vector) when ``n_batch > 1``."""
    counts = torch.as_tensor(counts, dtype=torch.get_default_dtype())
    if counts.dim() != 2:
        raise ValueError(f"pseudo-input counts must be a (K, G) matrix, got shape {tuple(counts.shape)}")
    raw = inverse_softplus((counts + shift).clamp_min(PSEUDO_COUNT_FLOOR))
    if n_batch > 1:
        raw = torch.cat([raw, raw.new_zeros(raw.shape[0], n_batch)], dim=-1)
    return raw


class VMMSCVIModule(PyroBaseModuleClass):
    """scVI as a Pyro program with a pluggable latent prior (see the module docstring for the math).

    Parameters
    ----------
    n_input
        Number of genes ``G``.
    n_batch
        Number of batches (1 for single-batch data).
    n_latent, n_hidden, n_layers, dropout_rate
        Network sizes (as ``scvi.model.SCVI``); dropout applies to the encoder only.
    gene_likelihood
        ``"zinb"`` or ``"nb"``.
    prior
        ``"normal" | "vampprior" | "gmm" | "vmm"``.
    n_clusters
        ``K``, the number of mixture components / pseudo-inputs (ignored by ``normal``).
    pseudo_inputs
        ``(K, G)`` counts of ``K`` cells used to initialise the pseudo-inputs (``vmm``/``vampprior`` only).
    inference
        ``"map-dp" | "map" | "mle"`` for ``gmm``/``vmm`` (see :mod:`pyro_vmm.priors`).
    var_activation
        ``"exp"`` (scvi-tools: :math:`\\sigma^2 = e^h + 10^{-4}`) or ``"softplus"`` (reference: :math:`\\sigma =
        \\operatorname{softplus}(h)`).
    pseudo_input_shift
        ``c`` in :math:`\\tilde x = \\operatorname{softplus}(v) - c`; 0 (default) or 1 (the reference code).
    """

    #: True for a query model (:mod:`pyro_vmm.query`): the prior stays as the reference left it, no EM step
    frozen_prior: bool = False

    def __init__(
        self,
        n_input: int,
        n_batch: int,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        gene_likelihood: GeneLikelihood = "zinb",
        prior: str = "vmm",
        n_clusters: int = 100,
        pseudo_inputs: Tensor | None = None,
        inference: str = "map-dp",
        var_activation: VarActivation = "exp",
        pseudo_input_shift: float = 0.0,
    ) -> None:
        super().__init__()
        if gene_likelihood not in ("zinb", "nb"):
            raise ValueError(f"gene_likelihood must be 'zinb' or 'nb', got {gene_likelihood!r}")
        if var_activation not in ("exp", "softplus"):
            raise ValueError(f"var_activation must be 'exp' or 'softplus', got {var_activation!r}")
        if int(n_input) < 1 or int(n_batch) < 1:
            raise ValueError(f"need n_input >= 1 and n_batch >= 1, got n_input={n_input}, n_batch={n_batch}")
        if not 0.0 <= float(dropout_rate) < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        self.n_input = int(n_input)
        self.n_batch = int(n_batch)
        self.n_latent = int(n_latent)
        self.gene_likelihood = gene_likelihood
        self.var_activation = var_activation
        self.pseudo_input_shift = float(pseudo_input_shift)
        #: width of the batch part of the encoder input (scvi-tools drops a 1-level covariate)
        self.n_batch_input = self.n_batch if self.n_batch > 1 else 0

        # q(z | x, s): FCLayers on concat(log1p(x), onehot(s)) -> mean / variance heads (as scvi.nn.Encoder)
        self.encoder = FCLayers(
            n_in=self.n_input + self.n_batch_input,
            n_out=n_hidden,
            n_cat_list=None,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=True,
            use_layer_norm=False,
            inject_covariates=False,
        )
        self.mean_encoder = nn.Linear(n_hidden, self.n_latent)
        self.var_encoder = nn.Linear(n_hidden, self.n_latent)
        # p(x | z, s): scvi-tools' decoder, batch one-hot concatenated to z in the first layer only
        self.decoder = DecoderSCVI(
            self.n_latent,
            self.n_input,
            n_cat_list=[self.n_batch],
            n_layers=n_layers,
            n_hidden=n_hidden,
            inject_covariates=False,
            use_batch_norm=True,
            use_layer_norm=False,
            scale_activation="softmax",
        )
        #: log inverse dispersion, theta_g = exp(px_r_g), initialised to theta = 1 (the reference's Exp bijector)
        self.px_r = nn.Parameter(torch.zeros(self.n_input))

        raw = None
        if prior.lower() in ("vmm", "vampprior"):
            if pseudo_inputs is None:
                raise ValueError(
                    f"prior={prior!r} needs pseudo_inputs: the (K, G) counts of K random cells "
                    "(VMMSCVI draws them for you; with the module alone pass e.g. counts[rng.choice(N, K)])"
                )
            pseudo_inputs = torch.as_tensor(pseudo_inputs)
            if pseudo_inputs.shape != (n_clusters, self.n_input):
                raise ValueError(
                    f"pseudo_inputs has shape {tuple(pseudo_inputs.shape)}, expected (n_clusters, n_genes) = "
                    f"({n_clusters}, {self.n_input})"
                )
            raw = counts_to_pseudo_inputs(pseudo_inputs, self.n_batch, self.pseudo_input_shift)
        self.prior = build_prior(prior, self.n_latent, n_components=n_clusters, pseudo_inputs=raw, inference=inference)

    # ------------------------------------------------------------------------------------------- scvi-tools glue
    @staticmethod
    def _get_fn_args_from_batch(tensor_dict: dict[str, Tensor]) -> tuple[tuple[Tensor, Tensor], dict]:
        return (tensor_dict[REGISTRY_KEYS.X_KEY], tensor_dict[REGISTRY_KEYS.BATCH_KEY]), {}

    @property
    def device(self) -> torch.device:
        return self.px_r.device

    def on_load(self, model, **kwargs) -> None:
        """Nothing to materialise: every parameter is in ``state_dict`` (no training step, unlike scvi-tools)."""
        pyro.clear_param_store()

    # ------------------------------------------------------------------------------------------- networks
    def _batch_onehot(self, batch_index: Tensor) -> Tensor:
        return F.one_hot(batch_index.reshape(-1).long(), self.n_batch).to(self.px_r.dtype)[:, : self.n_batch_input]

    def _posterior(self, encoder_input: Tensor) -> dist.Independent:
        """``q = N(m, diag sigma^2)`` from the encoder input ``concat(log1p(counts), batch_vector)``."""
        h = self.encoder(encoder_input)
        loc = self.mean_encoder(h)
        raw = self.var_encoder(h)
        if self.var_activation == "exp":
            scale = (torch.exp(raw) + VAR_EPS).sqrt()
        else:
            scale = F.softplus(raw)
        return dist.Normal(loc, scale).to_event(1)

    def encode(self, x: Tensor, batch_index: Tensor) -> dist.Independent:
        r""":math:`q_\phi(z \mid x, s)`, batch shape ``(B,)``, event ``(D,)`` (uses the current train/eval mode)."""
        return self._posterior(torch.cat([torch.log1p(x), self._batch_onehot(batch_index)], dim=-1))

    def pseudo_counts(self, u_raw: Tensor) -> tuple[Tensor, Tensor]:
        r"""Pseudo counts :math:`\operatorname{softplus}(v) - c`, batch vector :math:`\operatorname{softmax}(w)`."""
        counts = F.softplus(u_raw[..., : self.n_input]) - self.pseudo_input_shift
        batch = torch.softmax(u_raw[..., self.n_input :], dim=-1) if self.n_batch_input else u_raw[..., :0]
        return counts, batch

    def pseudo_posterior(self, u_raw: Tensor) -> dist.Independent:
        r""":math:`q_\phi(\mu_k \mid u_k)` for raw pseudo-inputs ``(K, G + n_batch)``, encoder in eval mode."""
        counts, batch = self.pseudo_counts(u_raw)
        with eval_mode(self.encoder):
            return self._posterior(torch.cat([torch.log1p(counts), batch], dim=-1))

    def likelihood(self, z: Tensor, library: Tensor, batch_index: Tensor) -> dist.TorchDistribution:
        r""":math:`p(x \mid z, \ell, s)` with event shape ``(G,)``; ``library`` is :math:`\ell` (counts, ``(B, 1)``)."""
        _, _, mu, zi_logits = self.decoder("gene", z, torch.log(library), batch_index)
        theta = torch.exp(self.px_r)
        logits = torch.log(mu + NB_EPS) - torch.log(theta + NB_EPS)
        px = NegativeBinomialCounts(total_count=theta, logits=logits)
        if self.gene_likelihood == "zinb":  # = dist.ZeroInflatedNegativeBinomial(theta, logits, gate_logits=h)
            px = ZeroInflatedNBCounts(px, gate_logits=zi_logits)
        return px.to_event(1)

    # ------------------------------------------------------------------------------------------- Pyro programs
    def model(self, x: Tensor, batch_index: Tensor) -> None:
        b = x.shape[0]
        library = x.sum(-1, keepdim=True)
        with pyro.plate("data", b), poutine.scale(scale=1.0 / b):
            z = pyro.sample("z", self.prior.latent_dist(self.pseudo_posterior))
            pyro.sample("x", self.likelihood(z, library, batch_index), obs=x)

    def guide(self, x: Tensor, batch_index: Tensor) -> None:
        b = x.shape[0]
        with pyro.plate("data", b), poutine.scale(scale=1.0 / b):
            pyro.sample("z", self.encode(x, batch_index))

    # ------------------------------------------------------------------------------------------- inference helpers
    @torch.no_grad()
    def latent_mean(self, x: Tensor, batch_index: Tensor) -> Tensor:
        """Posterior mean E_q[z | x, s] (networks in eval mode)."""
        with eval_mode(self):
            return self.encode(x, batch_index).mean

    @torch.no_grad()
    def cluster_probs(self, x: Tensor, batch_index: Tensor) -> Tensor:
        """q(c | z) at the posterior mean z (networks in eval mode), shape ``(B, K)``."""
        with eval_mode(self):
            z = self.encode(x, batch_index).mean
            return self.prior.cluster_probs(z, self.pseudo_posterior)

    @torch.no_grad()
    def normalized_expression(
        self, x: Tensor, batch_index: Tensor, n_samples: int = 1, batch_codes: tuple[int | None, ...] = (None,)
    ) -> Tensor:
        r"""Decoded expression frequencies :math:`\rho = \operatorname{softmax} f_\theta(z, s')`, :math:`z \sim
        q(z \mid x, s)`, averaged over the batches :math:`s'` in ``batch_codes`` (``None``: the cell's own batch).

        One set of ``n_samples`` draws of z serves every batch in ``batch_codes``, so the average over batches
        carries no extra Monte Carlo noise.  Networks in eval mode; returns ``(n_samples, B, G)``, rows sum to 1."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        b = x.shape[0]
        with eval_mode(self):
            z = self.encode(x, batch_index).sample((n_samples,)).reshape(n_samples * b, -1)
            log_library = torch.log(x.sum(-1, keepdim=True)).repeat(n_samples, 1)  # enters px_rate only, not rho
            own = batch_index.reshape(-1, 1).repeat(n_samples, 1)
            rho = 0.0
            for code in batch_codes:
                batch = own if code is None else torch.full_like(own, int(code))
                rho = rho + self.decoder("gene", z, log_library, batch)[0]
        return (rho / len(batch_codes)).reshape(n_samples, b, -1)

    def _likelihood_per_draw(self, z: Tensor, x: Tensor, batch_index: Tensor) -> dist.TorchDistribution:
        r""":math:`p(x \mid z_s, \ell, s)` for draws ``z`` ``(S, B, D)`` of the cells ``x`` ``(B, G)``, flattened to batch
        shape ``(S * B,)`` (draw-major: row ``s * B + n`` is cell ``n``'s draw ``s``)."""
        n_samples = z.shape[0]
        library = x.sum(-1, keepdim=True).repeat(n_samples, 1)
        batch_rep = batch_index.reshape(-1, 1).repeat(n_samples, 1)
        return self.likelihood(z.reshape(n_samples * x.shape[0], -1), library, batch_rep)

    @torch.no_grad()
    def log_weights(self, x: Tensor, batch_index: Tensor, n_samples: int) -> tuple[Tensor, Tensor]:
        r"""Importance log-weights :math:`\log w_s = \log p(x \mid z_s, \ell, s) + \log p(z_s) - \log q(z_s \mid x, s)`
        and the log-likelihood terms :math:`\log p(x \mid z_s, \ell, s)`, both ``(n_samples, B)``, for
        :math:`z_s \sim q(z \mid x, s)`; :math:`p(z)` is the model's prior (for the VMM the marginal mixture).
        Networks in eval mode."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        b = x.shape[0]
        with eval_mode(self):
            q = self.encode(x, batch_index)
            z = q.rsample((n_samples,))  # (S, B, D); the draws Pyro's guide would make from the same seed
            px = self._likelihood_per_draw(z, x, batch_index)
            log_px = px.log_prob(x.repeat(n_samples, 1)).reshape(n_samples, b)
            log_pz = self.prior.latent_dist(self.pseudo_posterior).log_prob(z)
            return log_px + log_pz - q.log_prob(z), log_px

    @torch.no_grad()
    def marginal_ll(
        self, x: Tensor, batch_index: Tensor, n_samples: int = 1000, n_samples_per_pass: int = 100
    ) -> Tensor:
        r"""Importance-sampled :math:`\log p(x \mid \ell, s) \approx \operatorname{LSE}_{s=1}^S \log w_s - \log S`
        per cell, shape ``(B,)`` (the IWAE bound of Burda et al.: below :math:`\log p(x)` in expectation, rising to
        it with :math:`S`; :math:`S = 1` is a one-sample ELBO).  ``n_samples_per_pass`` draws at a time bound the
        memory (``n_samples_per_pass x B x G`` likelihood terms)."""
        if n_samples < 1 or n_samples_per_pass < 1:
            raise ValueError(
                f"need n_samples >= 1 and n_samples_per_pass >= 1, got {n_samples} and {n_samples_per_pass}"
            )
        parts = []
        for start in range(0, n_samples, n_samples_per_pass):
            parts.append(self.log_weights(x, batch_index, min(n_samples_per_pass, n_samples - start))[0])
        return torch.logsumexp(torch.cat(parts), 0) - math.log(n_samples)

    @torch.no_grad()
    def posterior_predictive(self, x: Tensor, batch_index: Tensor, n_samples: int = 1) -> Tensor:
        r"""Replicated counts :math:`\tilde x^{(s)} \sim p(x \mid z^{(s)}, \ell, s)`, :math:`z^{(s)} \sim q(z \mid x)`.

        ``x`` enters only through the guide and the observed library size; returns ``(B, G, n_samples)``."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        b = x.shape[0]
        with eval_mode(self):
            z = self.encode(x, batch_index).sample((n_samples,))  # (S, B, D)
            x_rep = self._likelihood_per_draw(z, x, batch_index).sample()
        return x_rep.reshape(n_samples, b, -1).permute(1, 2, 0)
