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
(mean :math:`\mu`, variance :math:`\mu + \mu^2/\theta`); the ZINB is ``ZeroInflatedDistribution(NB,
gate_logits=h)``, i.e. ``dist.ZeroInflatedNegativeBinomial``.  Both are :class:`GeneCounts`, which takes the decoder's
pre-softmax logits and evaluates the softmax, both densities and their gradient in one hand-written autograd function
(same values and gradients as Pyro's distributions; the ``lgamma`` terms on the non-zero counts only).

Amortised posterior (guide): :math:`q_\phi(z_n \mid x_n) = \mathcal N(m_n, \operatorname{diag} \sigma_n^2)`
from ``log1p(x_n)`` (the default, as ``scvi.model.SCVI``; with ``encode_covariates=True`` from
``concat(log1p(x_n), onehot(s_n))``, the reference code's encoder) through ``n_layers x [Linear -> BatchNorm(momentum 0.01, eps 1e-3) -> ReLU
-> Dropout]``; the variance is :math:`\sigma^2 = \exp(\cdot) + 10^{-4}` (scvi-tools' default, ``var_activation=
"exp"``) or :math:`\sigma = \operatorname{softplus}(\cdot)` (the VMM authors' TensorFlow code, ``"softplus"``).
The decoder is scvi-tools' :class:`~scvi.nn.DecoderSCVI` on ``concat(z, onehot(s))`` without deep covariate injection,
i.e. the same networks as ``scvi.model.SCVI(..., encode_covariates=..., deeply_inject_covariates=False)``
(identical to SCVI's default deep injection when ``n_layers=1``).

Pseudo-inputs (``vmm``, ``vampprior``): :math:`u_k = \tilde x_k` (or :math:`(\tilde x_k, \tilde s_k)` with
``encode_covariates=True``) with counts
:math:`\tilde x_k = \operatorname{softplus}(v_k) - c` (``c = 0`` by default; ``c = 1`` is the reference code's
shifted softplus) and a soft batch vector :math:`\tilde s_k = \operatorname{softmax}(w_k)` started uniform (``encode_covariates``).  They pass
through the same encoder (in eval mode) to give :math:`q_\phi(\mu_k \mid u_k)`.  The raw :math:`(v_k, w_k)` are the
prior's ``pseudo_inputs`` parameter, shape ``(K, G + n_batch_input + sum(n_cats))`` (``(K, G)`` when the encoder
reads no covariate): counts, then the batch logits, then each categorical covariate's logits.

Covariates (``setup_anndata(categorical_covariate_keys=..., continuous_covariate_keys=..., size_factor_key=...)``)
enter as in ``scvi.model.SCVI``: the decoder reads ``concat(z, c_n)`` (continuous covariates :math:`c_n`) with the
one-hot batch and one one-hot per categorical covariate :math:`k_n^{(j)}` concatenated in its first layer; with
``encode_covariates=True`` the encoder reads ``concat(log1p(x), c_n, onehot(s_n), onehot(k_n^{(1)}), ...)``.  A
registered size factor :math:`\mathrm{sf}_n` replaces the observed library size: :math:`\ell_n = \mathrm{sf}_n`
(scvi-tools' ``library = log(size_factor)``; its decoder then switches to a softplus scale, ours keeps the softmax,
so :math:`\ell_n` is the expected total count).  Pseudo-inputs, when the encoder reads covariates: one soft vector
per categorical covariate (``softmax`` of its own logits, started uniform, like the batch part) and the training
cells' mean of the continuous covariates (fixed, the buffer ``pseudo_cont_covs``); with ``encode_covariates=False``
the encoder reads expression alone and the pseudo-inputs are expression profiles only.

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
from pyro.distributions import constraints
from scvi import REGISTRY_KEYS
from scvi.nn import DecoderSCVI
from torch import Tensor, nn

from pyro_vmm.models._layers import (
    DECODER_NORM, NONZERO_KEY, CountsModule, check_choice, check_pseudo_inputs, gaussian_encoder,
)
from pyro_vmm.priors import build_prior
from pyro_vmm.utils import eval_mode, inverse_softplus

__all__ = [
    "NONZERO_KEY",
    "GeneCounts",
    "VMMSCVIModule",
    "counts_to_pseudo_inputs",
    "inverse_softplus",
]

#: floor on the variance of q(z|x) for ``var_activation="exp"`` (scvi-tools' ``var_eps``)
VAR_EPS = 1e-4
#: pseudo-input counts are clamped to at least this before the inverse softplus
PSEUDO_COUNT_FLOOR = 1e-3

GeneLikelihood = Literal["zinb", "nb"]
VarActivation = Literal["exp", "softplus"]


def _digamma(y: Tensor) -> Tensor:
    r""":math:`\psi(y)` for :math:`y > 0` in a dozen vectorised passes (torch's CPU ``digamma`` is scalar code, 4-5x
    slower): :math:`\psi(y) = \psi(y + 6) - \sum_{j=0}^{5} 1/(y + j)` and the asymptotic series at :math:`w = y + 6
    \ge 6`, :math:`\psi(w) = \ln w - \tfrac1{2w} - \tfrac1{12w^2} + \tfrac1{120w^4} - \tfrac1{252w^6} +
    \tfrac1{240w^8} + O(w^{-10})` (truncation error below :math:`10^{-9}`)."""
    shift = torch.reciprocal(y)
    for j in range(1, 6):
        shift.add_(torch.add(y, float(j)).reciprocal_())
    w = torch.add(y, 6.0)
    iw = w.reciprocal()
    iw2 = iw * iw
    series = iw2 * (1.0 / 240.0) - 1.0 / 252.0
    series.mul_(iw2).add_(1.0 / 120.0).mul_(iw2).sub_(1.0 / 12.0).mul_(iw2)
    return w.log_().sub_(iw.mul_(0.5)).add_(series).sub_(shift)


def _counts_log_prob(
    s: Tensor, log_lib: Tensor, r: Tensor, h: Tensor | None, x: Tensor, rows: Tensor, cols: Tensor, grad: bool
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor | None] | None]:
    r"""Per-cell NB / ZINB log-density summed over genes, and (``grad``) its unit gradients; see :class:`GeneCounts`.

    Every dense ``(B, G)`` pass is written for a zero count; the non-zero counts (at ``rows``, ``cols``) are then
    corrected through flat gathers and scatters.  Five ``(B, G)`` buffers are allocated and reused in place (a fresh
    allocation of that size costs about as much as an ``exp`` pass on CPU).  Returns ``(log_p (B,), (G_a, G_r, rho,
    G_h))``: :math:`G_a = \partial \log p / \partial a` at :math:`a = \log\mu`, :math:`G_r, G_h` likewise for
    :math:`r = \log\theta` and :math:`h`, and :math:`\rho = \operatorname{softmax}(f)`."""
    zi = h is not None
    flat = rows * s.shape[-1] + cols

    def take(a: Tensor) -> Tensor:
        return a.reshape(-1).index_select(0, flat)

    theta = torch.exp(r)
    rho = torch.softmax(s, -1)
    t = torch.mul(rho, torch.exp(log_lib)).mul_(theta.reciprocal())  # t = mu / theta
    a0 = torch.log1p(t).mul_(-theta)  # A0 = log NB(0) = -theta log(1 + t)
    t_n, a0_n = take(t), take(a0)
    buf = torch.add(t, 1.0)
    sig = t.div_(buf)  # sigma(eta) = mu / (theta + mu), in t's buffer
    if zi:
        sh = torch.sigmoid(h)
        d = torch.exp(a0, out=buf)
        q = torch.mul(sh, d).neg_().add_(d)  # sigma(-h) e^{A0}
        d = torch.add(q, sh, out=d).clamp_(min=torch.finfo(d.dtype).tiny)  # p(x = 0)
        if grad:
            q.div_(d)  # P(NB | x = 0)
        out0 = d.log_()
    else:
        out0 = a0
    x_n, theta_n = take(x), theta.index_select(0, cols)
    theta_x = theta_n + x_n
    lgamma = torch.lgamma(theta_x).sub_(torch.lgamma(theta).index_select(0, cols)).sub_(torch.lgamma(x_n + 1.0))
    # log NB(x) = x log sigma(eta) + A0 + lgamma terms, log sigma(eta) = log t - log(1 + t) = log t + A0 / theta
    corr = torch.log(t_n).add_(a0_n / theta_n).mul_(x_n).add_(a0_n).add_(lgamma)
    if zi:
        corr.sub_(F.softplus(take(h)))
    total = out0.sum(-1).index_add_(0, rows, corr.sub_(take(out0)))
    if not grad:
        return total, None
    u_n = (1.0 + t_n).reciprocal_()  # 1 - sigma(eta) at the non-zero counts
    sig_n = t_n * u_n
    theta_sig = sig.mul_(theta)  # theta sigma(eta), in t's buffer
    g_r = a0.add_(theta_sig)  # zero count: q (A0 + theta sigma)
    g_a = theta_sig.neg_()  # zero count: -q theta sigma
    g_h = None
    if zi:
        g_r.mul_(q)
        g_a.mul_(q)
        g_h = sh.neg_().add_(1.0).sub_(q)  # zero count: (1 - q) - sigma(h), in sigma(h)'s buffer
        g_h.view(-1).index_copy_(0, flat, take(g_h).sub_(1.0).add_(take(q)))  # x > 0: -sigma(h)
    g_a.view(-1).index_copy_(0, flat, x_n - theta_x * sig_n)
    digamma = _digamma(theta_x).sub_(torch.digamma(theta).index_select(0, cols))
    g_r.view(-1).index_copy_(0, flat, digamma.add_(sig_n).mul_(theta_n).add_(a0_n).sub_(x_n * u_n))
    return total, (g_a, g_r, rho, g_h)


class _CountsLogProb(torch.autograd.Function):
    """Autograd wrapper of :func:`_counts_log_prob`: the forward pass also computes the unit gradients, the backward
    pass only scales them (and maps :math:`\\partial a` through the log-softmax)."""

    @staticmethod
    def forward(ctx, s, log_lib, r, h, x, rows, cols):
        total, (g_a, g_r, rho, g_h) = _counts_log_prob(s, log_lib, r, h, x, rows, cols, grad=True)
        ctx.save_for_backward(g_a, g_r, rho, g_h)
        return total

    @staticmethod
    def backward(ctx, g):
        g_a, g_r, rho, g_h = ctx.saved_tensors
        col = g.unsqueeze(-1)
        d_s = g_a * col
        d_lib = d_s.sum(-1, keepdim=True)  # a = log ell + log_softmax(s): d/d log ell = sum_g d/da
        d_s.addcmul_(rho, d_lib, value=-1.0)  # d/ds = d/da - rho sum_g d/da
        d_h = g_h * col if g_h is not None else None
        return d_s, d_lib, g @ g_r, d_h, None, None, None


class GeneCounts(dist.TorchDistribution):
    r"""scVI's count likelihood :math:`p(x_n \mid z_n, \ell_n, s_n)` over the ``G`` genes of each cell, straight from
    the decoder's outputs: batch shape ``(B,)``, event shape ``(G,)``.

    With scale logits :math:`f` (the decoder's pre-softmax output), :math:`\mu_{ng} = \ell_n
    \operatorname{softmax}(f_n)_g`, :math:`\theta_g = e^{r_g}` and gate logits :math:`h` (ZINB; ``None`` for the NB):

    .. math:: \log \mathrm{NB}(x \mid \mu, \theta) = \theta\log\tfrac{\theta}{\theta+\mu}
              + x\log\tfrac{\mu}{\theta+\mu} + \log\Gamma(\theta+x) - \log\Gamma(\theta) - \log\Gamma(x+1),

    .. math:: \log \mathrm{ZINB}(x) = \begin{cases} \log\big(\sigma(h) + \sigma(-h)\,\mathrm{NB}(0)\big) & x = 0 \\
              \log\sigma(-h) + \log\mathrm{NB}(x) & x > 0, \end{cases}

    the distribution of Pyro's ``ZeroInflatedNegativeBinomial(total_count=theta, logits=log(mu) - log(theta),
    gate_logits=h)`` (``NegativeBinomial`` for the NB), summed over genes.  ``log_prob`` is one hand-written autograd
    function (:func:`_counts_log_prob`): the softmax, the logits and both densities in a few in-place passes over
    the ``(B, G)`` counts, the ``lgamma``/``digamma`` terms on the non-zero counts only; values and gradients equal
    Pyro's (tested, ``gradcheck`` in float64).  :math:`\log\mu` is computed exactly, as
    :math:`\log\ell + \operatorname{log\_softmax}(f)`, without the ``eps = 1e-8`` scvi-tools adds inside
    :math:`\log(\mu + \epsilon)` (the two differ only where :math:`\mu \lesssim 10^{-7}`).  Sampling is Pyro's."""

    arg_constraints: dict = {}
    support = constraints.independent(constraints.nonnegative_integer, 1)

    def __init__(
        self,
        scale_logits: Tensor,
        log_library: Tensor,
        log_theta: Tensor,
        gate_logits: Tensor | None = None,
        nonzero: tuple[Tensor, Tensor] | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if scale_logits.dim() != 2:
            raise ValueError(f"scale_logits must be (cells, genes), got shape {tuple(scale_logits.shape)}")
        self.scale_logits, self.log_theta, self.gate_logits = scale_logits, log_theta, gate_logits
        self.log_library = log_library.reshape(-1, 1)
        #: ``(rows, cols)`` of the non-zero entries of the counts ``log_prob`` will see, as ``torch.nonzero(x,
        #: as_tuple=True)`` gives them, when the caller has them (``None``: ``log_prob`` finds them)
        self.nonzero = nonzero
        super().__init__(scale_logits.shape[:1], scale_logits.shape[1:], validate_args=validate_args)

    @property
    def zero_inflated(self) -> bool:
        return self.gate_logits is not None

    def stock(self) -> dist.TorchDistribution:
        """The same distribution as Pyro's ``(ZeroInflated)NegativeBinomial(...).to_event(1)``."""
        logits = torch.log_softmax(self.scale_logits, -1) + self.log_library - self.log_theta
        theta = torch.exp(self.log_theta).expand_as(logits)
        if self.zero_inflated:
            return dist.ZeroInflatedNegativeBinomial(theta, logits=logits, gate_logits=self.gate_logits).to_event(1)
        return dist.NegativeBinomial(theta, logits=logits).to_event(1)

    @property
    def mean(self) -> Tensor:
        mu = torch.exp(self.log_library) * torch.softmax(self.scale_logits, -1)
        return mu * torch.sigmoid(-self.gate_logits) if self.zero_inflated else mu

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.stock().sample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        if value.shape != self.scale_logits.shape:
            raise ValueError(
                f"counts of shape {tuple(value.shape)} for a likelihood of {tuple(self.scale_logits.shape)}"
            )
        rows, cols = torch.nonzero(value, as_tuple=True) if self.nonzero is None else self.nonzero
        args = (self.scale_logits, self.log_library, self.log_theta, self.gate_logits, value, rows, cols)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:4]):
            return _CountsLogProb.apply(*args)
        return _counts_log_prob(*args, grad=False)[0]


def counts_to_pseudo_inputs(counts: Tensor, n_batch: int, shift: float = 0.0) -> Tensor:
    r"""Raw pseudo-input parameters :math:`(v_k, w_k)` from K cells' counts ``(K, G)``.

    :math:`v_k = \operatorname{softplus}^{-1}(\max(x_k + c, \epsilon))` so that
    :math:`\operatorname{softplus}(v_k) - c = x_k` (zeros become :math:`\epsilon - c` when ``c = 0``),
    and :math:`w_k = 0` (uniform soft vectors) in the ``n_batch`` columns after them (``n_batch > 1``: the batch
    and categorical-covariate logits, together)."""
    counts = torch.as_tensor(counts, dtype=torch.get_default_dtype())
    if counts.dim() != 2:
        raise ValueError(f"pseudo-input counts must be a (K, G) matrix, got shape {tuple(counts.shape)}")
    raw = inverse_softplus((counts + shift).clamp_min(PSEUDO_COUNT_FLOOR))
    if n_batch > 1:
        raw = torch.cat([raw, raw.new_zeros(raw.shape[0], n_batch)], dim=-1)
    return raw


#: minibatch keys of the registered covariates -> keyword of the module's methods
COVARIATE_KEYS = {
    REGISTRY_KEYS.CAT_COVS_KEY: "cat_covs",
    REGISTRY_KEYS.CONT_COVS_KEY: "cont_covs",
    REGISTRY_KEYS.SIZE_FACTOR_KEY: "size_factor",
}


def covariate_kwargs(tensor_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The registered covariates of a minibatch dict as the module's keyword arguments (absent ones left out)."""
    return {kw: tensor_dict[key] for key, kw in COVARIATE_KEYS.items() if tensor_dict.get(key) is not None}


class VMMSCVIModule(CountsModule):
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
    encode_covariates
        Give the batch to the encoder too (``True``, the reference code) or only to the decoder (``False``, the
        default, as ``scvi.model.SCVI``'s default).  Without it the encoder sees expression alone, so the
        pseudo-inputs are expression profiles (no batch vector) and no mixture component can belong to one batch
        through its input.  With ``True`` the continuous and categorical covariates go to the encoder too (as
        scvi-tools' ``encode_covariates``).
    n_continuous_cov, n_cats_per_cov
        Number of continuous covariates and the number of categories of each categorical covariate (as
        scvi-tools' ``VAE``); both go to the decoder (and, with ``encode_covariates``, to the encoder).
    cont_covs_mean
        ``(n_continuous_cov,)`` training-cell mean of the continuous covariates: the pseudo-inputs' continuous part
        when the encoder reads them (default zeros; stored in the buffer ``pseudo_cont_covs``).
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int,
        n_latent: int = 10, n_hidden: int = 128, n_layers: int = 1, dropout_rate: float = 0.1,
        gene_likelihood: GeneLikelihood = "zinb",
        prior: str = "vmm", n_clusters: int = 100, pseudo_inputs: Tensor | None = None, inference: str = "map-dp",
        var_activation: VarActivation = "exp",
        pseudo_input_shift: float = 0.0,
        encode_covariates: bool = False,
        n_continuous_cov: int = 0,
        n_cats_per_cov: list[int] | tuple[int, ...] | None = None,
        cont_covs_mean: Tensor | None = None,
    ) -> None:
        super().__init__()
        check_choice("gene_likelihood", gene_likelihood, ("zinb", "nb"))
        check_choice("var_activation", var_activation, ("exp", "softplus"))
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
        self.encode_covariates = bool(encode_covariates)
        self.n_batch_input = self.n_batch if self.n_batch > 1 and self.encode_covariates else 0
        self.n_continuous_cov = int(n_continuous_cov)
        self.n_cats_per_cov = [int(n) for n in (n_cats_per_cov or [])]
        #: widths of the continuous part and of each categorical one-hot the encoder reads (1-level covariates: 0)
        self.n_cont_input = self.n_continuous_cov if self.encode_covariates else 0
        self.cat_input_widths = [n if n > 1 else 0 for n in self.n_cats_per_cov] if self.encode_covariates else []
        mean = torch.zeros(self.n_continuous_cov) if cont_covs_mean is None else torch.as_tensor(cont_covs_mean)
        if mean.shape != (self.n_continuous_cov,):
            raise ValueError(f"cont_covs_mean has shape {tuple(mean.shape)}, expected ({self.n_continuous_cov},)")
        self.register_buffer("pseudo_cont_covs", mean.to(torch.get_default_dtype()).clone())

        # q(z | x, s, k, c): FCLayers on concat(log1p(x), c, onehot(s), onehot(k_j)...) -> mean / variance heads
        # (as scvi.nn.Encoder; only log1p(x) unless encode_covariates)
        n_in = self.n_input + self.n_cont_input + self.n_batch_input + sum(self.cat_input_widths)
        self.encoder, self.mean_encoder, self.var_encoder = gaussian_encoder(
            n_in, n_hidden, self.n_latent, n_layers, dropout_rate, inject_covariates=False
        )
        # p(x | z, s, k, c): scvi-tools' decoder on concat(z, c), batch and covariate one-hots in the first layer only
        self.decoder = DecoderSCVI(
            self.n_latent + self.n_continuous_cov,
            self.n_input,
            n_cat_list=[self.n_batch, *self.n_cats_per_cov],
            n_layers=n_layers,
            n_hidden=n_hidden,
            inject_covariates=False,
            **DECODER_NORM,
        )
        #: log inverse dispersion, theta_g = exp(px_r_g), initialised to theta = 1 (the reference's Exp bijector)
        self.px_r = nn.Parameter(torch.zeros(self.n_input))

        counts = check_pseudo_inputs(
            prior, pseudo_inputs, (n_clusters, self.n_input), "n_genes", "the (K, G) counts of K random cells "
            "(VMMSCVI draws them for you; with the module alone pass e.g. counts[rng.choice(N, K)])",
        )
        n_soft = self.n_batch_input + sum(self.cat_input_widths)
        raw = None if counts is None else counts_to_pseudo_inputs(counts, n_soft, self.pseudo_input_shift)
        self.prior = build_prior(prior, self.n_latent, n_components=n_clusters, pseudo_inputs=raw, inference=inference)

    # ------------------------------------------------------------------------------------------- scvi-tools glue
    @staticmethod
    def _get_fn_args_from_batch(tensor_dict: dict[str, Tensor]) -> tuple[tuple[Tensor, Tensor], dict]:
        """``(x, batch_index), {"nonzero": (rows, cols), "cat_covs": ..., "cont_covs": ..., "size_factor": ...}``;
        the non-zero positions of ``x`` come with minibatches of :class:`~pyro_vmm.scvi._data.CountsDataset` (key
        ``"nonzero"``, shape ``(2, nnz)``), the covariates when registered; absent keys are left out."""
        return CountsModule._batch_args(tensor_dict, covariate_kwargs(tensor_dict))

    # ------------------------------------------------------------------------------------------- networks
    def _batch_onehot(self, batch_index: Tensor) -> Tensor:
        return F.one_hot(batch_index.reshape(-1).long(), self.n_batch).to(self.px_r.dtype)[:, : self.n_batch_input]

    def _check_covs(self, cat_covs: Tensor | None, cont_covs: Tensor | None) -> None:
        if self.n_cats_per_cov and (cat_covs is None or cat_covs.shape[-1] != len(self.n_cats_per_cov)):
            raise ValueError(
                f"this model was set up with {len(self.n_cats_per_cov)} categorical covariate(s); pass cat_covs "
                f"(B, {len(self.n_cats_per_cov)}) codes, got {None if cat_covs is None else tuple(cat_covs.shape)}"
            )
        if self.n_continuous_cov and (cont_covs is None or cont_covs.shape[-1] != self.n_continuous_cov):
            raise ValueError(
                f"this model was set up with {self.n_continuous_cov} continuous covariate(s); pass cont_covs "
                f"(B, {self.n_continuous_cov}), got {None if cont_covs is None else tuple(cont_covs.shape)}"
            )

    def _covariate_input(self, batch_index: Tensor, cat_covs: Tensor | None, cont_covs: Tensor | None) -> Tensor:
        """The encoder's covariate columns ``concat(c, onehot(s), onehot(k_1), ...)`` (empty without
        ``encode_covariates``)."""
        self._check_covs(cat_covs, cont_covs)
        parts = [cont_covs.to(self.px_r.dtype)] if self.n_cont_input else []
        parts.append(self._batch_onehot(batch_index))
        for j, width in enumerate(self.cat_input_widths):
            if width:
                parts.append(F.one_hot(cat_covs[:, j].long(), width).to(self.px_r.dtype))
        return torch.cat(parts, dim=-1)

    def _decoder_args(
        self, z: Tensor, batch_index: Tensor, cat_covs: Tensor | None, cont_covs: Tensor | None
    ) -> tuple[Tensor, list[Tensor]]:
        """``(concat(z, c), [batch, k_1, ...])``: the decoder's input and its categorical arguments, as scvi-tools'
        ``VAE.generative`` builds them."""
        self._check_covs(cat_covs, cont_covs)
        if self.n_continuous_cov:
            z = torch.cat([z, cont_covs.to(z.dtype)], dim=-1)
        cats = [batch_index.reshape(-1, 1)]
        if self.n_cats_per_cov:
            cats.extend(cat_covs.split(1, dim=-1))
        return z, cats

    @staticmethod
    def _library(x: Tensor, size_factor: Tensor | None) -> Tensor:
        r""":math:`\ell_n`, ``(B, 1)``: the size factor when registered, else the observed total count."""
        return x.sum(-1, keepdim=True) if size_factor is None else size_factor.reshape(-1, 1).to(x.dtype)

    def _posterior(self, encoder_input: Tensor) -> dist.Independent:
        """``q = N(m, diag sigma^2)`` from the encoder input ``concat(log1p(counts), covariate_vector)``."""
        h = self.encoder(encoder_input)
        loc = self.mean_encoder(h)
        raw = self.var_encoder(h)
        if self.var_activation == "exp":
            scale = (torch.exp(raw) + VAR_EPS).sqrt()
        else:
            scale = F.softplus(raw)
        return dist.Normal(loc, scale).to_event(1)

    def encode(
        self, x: Tensor, batch_index: Tensor, cat_covs: Tensor | None = None, cont_covs: Tensor | None = None
    ) -> dist.Independent:
        r""":math:`q_\phi(z \mid x, s, k, c)`, batch shape ``(B,)``, event ``(D,)`` (uses the current train/eval
        mode); the covariates are read only with ``encode_covariates``."""
        return self._posterior(torch.cat([torch.log1p(x), self._covariate_input(batch_index, cat_covs, cont_covs)], -1))

    def pseudo_counts(self, u_raw: Tensor) -> tuple[Tensor, Tensor]:
        r"""Pseudo counts :math:`\operatorname{softplus}(v) - c` and the covariate vector: the continuous means, the
        soft batch vector :math:`\operatorname{softmax}(w)` and one softmax per categorical covariate."""
        g = self.n_input
        counts = F.softplus(u_raw[..., :g]) - self.pseudo_input_shift
        parts = []
        if self.n_cont_input:
            parts.append(self.pseudo_cont_covs.to(u_raw.dtype).expand(*u_raw.shape[:-1], -1))
        start = g
        for width in [self.n_batch_input, *self.cat_input_widths]:
            if width:
                parts.append(torch.softmax(u_raw[..., start : start + width], dim=-1))
                start += width
        return counts, (torch.cat(parts, dim=-1) if parts else u_raw[..., :0])

    def pseudo_posterior(self, u_raw: Tensor) -> dist.Independent:
        r""":math:`q_\phi(\mu_k \mid u_k)` for raw pseudo-inputs, encoder in eval mode."""
        counts, covs = self.pseudo_counts(u_raw)
        with eval_mode(self.encoder):
            return self._posterior(torch.cat([torch.log1p(counts), covs], dim=-1))

    def likelihood(
        self,
        z: Tensor,
        library: Tensor,
        batch_index: Tensor,
        nonzero: tuple[Tensor, Tensor] | None = None,
        cat_covs: Tensor | None = None,
        cont_covs: Tensor | None = None,
    ) -> dist.TorchDistribution:
        r""":math:`p(x \mid z, \ell, s, k, c)` with event shape ``(G,)``; ``library`` is :math:`\ell` (counts,
        ``(B, 1)``); ``nonzero``: the positions of the non-zero counts, when known (see :class:`GeneCounts`)."""
        scale_logits, gate_logits = self.decode_logits(z, batch_index, cat_covs, cont_covs)
        return GeneCounts(scale_logits, torch.log(library), self.px_r, gate_logits, nonzero)

    def decode_logits(
        self, z: Tensor, batch_index: Tensor, cat_covs: Tensor | None = None, cont_covs: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        r"""The decoder's pre-softmax :math:`\log\rho` (up to a constant) and the zero-inflation logits :math:`h`
        (``None`` for the NB), each ``(B, G)``."""
        dec_in, cats = self._decoder_args(z, batch_index, cat_covs, cont_covs)
        px = self.decoder.px_decoder(dec_in, *cats)
        scale_logits = self.decoder.px_scale_decoder[0](px)  # DecoderSCVI's Linear before its Softmax
        gate_logits = self.decoder.px_dropout_decoder(px) if self.gene_likelihood == "zinb" else None
        return scale_logits, gate_logits

    # ------------------------------------------------------------------------------------------- Pyro programs
    def model(
        self,
        x: Tensor, batch_index: Tensor,
        nonzero: tuple[Tensor, Tensor] | None = None,
        cat_covs: Tensor | None = None,
        cont_covs: Tensor | None = None,
        size_factor: Tensor | None = None,
    ) -> None:
        """``nonzero``: the ``(rows, cols)`` of ``x``'s non-zero counts, as ``torch.nonzero(x, as_tuple=True)`` gives
        them (computed when ``None``; the data loader passes them along, which saves that pass).  ``cat_covs``
        ``(B, n_cat_covs)`` codes, ``cont_covs`` ``(B, n_cont_covs)``, ``size_factor`` ``(B, 1)``: the registered
        covariates (see the module docstring)."""
        b = x.shape[0]
        library = self._library(x, size_factor)
        with pyro.plate("data", b), poutine.scale(scale=1.0 / b):
            z = pyro.sample("z", self.prior.latent_dist(self.pseudo_posterior))
            pyro.sample("x", self.likelihood(z, library, batch_index, nonzero, cat_covs, cont_covs), obs=x)

    def guide(
        self, x: Tensor, batch_index: Tensor, nonzero: tuple[Tensor, Tensor] | None = None, **covs: Tensor | None
    ) -> None:
        """Takes :meth:`model`'s arguments; the encoder reads the covariates of ``covs`` it was built for."""
        b = x.shape[0]
        with pyro.plate("data", b), poutine.scale(scale=1.0 / b):
            pyro.sample("z", self._encode(x, batch_index, covs))

    # ------------------------------------------------------------------------------------------- inference helpers
    # ``**covs``: the registered covariates, ``cat_covs``, ``cont_covs``, ``size_factor`` (see :meth:`model`)
    @torch.no_grad()
    def latent_mean(
        self, x: Tensor, batch_index: Tensor, nonzero: tuple[Tensor, Tensor] | None = None, **covs: Tensor | None
    ) -> Tensor:
        """Posterior mean E_q[z | x, s] (networks in eval mode)."""
        with eval_mode(self):
            return self._encode(x, batch_index, covs).mean

    def _encode(self, x: Tensor, batch_index: Tensor, covs: dict) -> dist.Independent:
        """:meth:`encode` with the covariates of ``covs`` that are given (none: ``encode(x, batch_index)``)."""
        given = {k: covs[k] for k in ("cat_covs", "cont_covs") if covs.get(k) is not None}
        return self.encode(x, batch_index, **given)

    @torch.no_grad()
    def latent_moments(self, x: Tensor, batch_index: Tensor, **covs: Tensor | None) -> tuple[Tensor, Tensor]:
        """Mean and variance of :math:`q(z \\mid x, s)`, each ``(B, D)`` (networks in eval mode)."""
        with eval_mode(self):
            q = self._encode(x, batch_index, covs).base_dist
            return q.loc, q.scale.square()

    @torch.no_grad()
    def latent_sample(self, x: Tensor, batch_index: Tensor, **covs: Tensor | None) -> Tensor:
        """One draw :math:`z \\sim q(z \\mid x, s)` per cell, ``(B, D)`` (networks in eval mode)."""
        with eval_mode(self):
            return self._encode(x, batch_index, covs).sample()

    @torch.no_grad()
    def cluster_probs(
        self,
        x: Tensor, batch_index: Tensor,
        give_mean: bool = True,
        mc_samples: int = 100,
        rows_per_pass: int = 16384,
        **covs: Tensor | None,
    ) -> Tensor:
        """:math:`q(c \\mid z)`, shape ``(B, K)`` (networks in eval mode): at the posterior mean z (``give_mean``), or
        averaged over ``mc_samples`` draws :math:`z \\sim q(z \\mid x, s)`, ``rows_per_pass`` cell-draws at a time."""
        with eval_mode(self):
            q = self._encode(x, batch_index, covs)
            return self._posterior_cluster_probs(q, give_mean, mc_samples, rows_per_pass)

    @staticmethod
    def _repeat_covs(covs: dict, n_samples: int) -> dict:
        return {k: (None if v is None else v.repeat(n_samples, 1) if v.dim() == 2 else v.repeat(n_samples))
                for k, v in covs.items()}

    @torch.no_grad()
    def normalized_expression(
        self,
        x: Tensor, batch_index: Tensor,
        n_samples: int = 1, batch_codes: tuple[int | None, ...] = (None,),
        **covs: Tensor | None,
    ) -> Tensor:
        r"""Decoded expression frequencies :math:`\rho = \operatorname{softmax} f_\theta(z, s', k, c)`, :math:`z \sim
        q(z \mid x, s)`, averaged over the batches :math:`s'` in ``batch_codes`` (``None``: the cell's own batch);
        the covariates :math:`k, c` are the cell's own.

        One set of ``n_samples`` draws of z serves every batch in ``batch_codes``, so the average over batches
        carries no extra Monte Carlo noise.  Networks in eval mode; returns ``(n_samples, B, G)``, rows sum to 1."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        b = x.shape[0]
        with eval_mode(self):
            z = self._encode(x, batch_index, covs).sample((n_samples,)).reshape(n_samples * b, -1)
            rep = self._repeat_covs(covs, n_samples)
            # enters px_rate only, not rho
            log_library = torch.log(self._library(x, covs.get("size_factor"))).repeat(n_samples, 1)
            own = batch_index.reshape(-1, 1).repeat(n_samples, 1)
            rho = 0.0
            for code in batch_codes:
                batch = own if code is None else torch.full_like(own, int(code))
                dec_in, cats = self._decoder_args(z, batch, rep.get("cat_covs"), rep.get("cont_covs"))
                rho = rho + self.decoder("gene", dec_in, log_library, *cats)[0]
        return (rho / len(batch_codes)).reshape(n_samples, b, -1)

    def _likelihood_per_draw(self, z: Tensor, x: Tensor, batch_index: Tensor, covs: dict) -> dist.TorchDistribution:
        r""":math:`p(x \mid z_s, \ell, s)` for draws ``z`` ``(S, B, D)`` of the cells ``x`` ``(B, G)``, flattened to batch
        shape ``(S * B,)`` (draw-major: row ``s * B + n`` is cell ``n``'s draw ``s``)."""
        n_samples = z.shape[0]
        library = self._library(x, covs.get("size_factor")).repeat(n_samples, 1)
        batch_rep = batch_index.reshape(-1, 1).repeat(n_samples, 1)
        rep = self._repeat_covs(covs, n_samples)
        return self.likelihood(
            z.reshape(n_samples * x.shape[0], -1), library, batch_rep, None, rep.get("cat_covs"), rep.get("cont_covs")
        )

    @torch.no_grad()
    def log_weights(
        self, x: Tensor, batch_index: Tensor, n_samples: int, **covs: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        r"""Importance log-weights :math:`\log w_s = \log p(x \mid z_s, \ell, s) + \log p(z_s) - \log q(z_s \mid x, s)`
        and the log-likelihood terms :math:`\log p(x \mid z_s, \ell, s)`, both ``(n_samples, B)``, for
        :math:`z_s \sim q(z \mid x, s)`; :math:`p(z)` is the model's prior (for the VMM the marginal mixture).
        Networks in eval mode."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        b = x.shape[0]
        with eval_mode(self):
            q = self._encode(x, batch_index, covs)
            z = q.rsample((n_samples,))  # (S, B, D); the draws Pyro's guide would make from the same seed
            px = self._likelihood_per_draw(z, x, batch_index, covs)
            log_px = px.log_prob(x.repeat(n_samples, 1)).reshape(n_samples, b)
            log_pz = self.prior.latent_dist(self.pseudo_posterior).log_prob(z)
            return log_px + log_pz - q.log_prob(z), log_px

    @torch.no_grad()
    def marginal_ll(
        self, x: Tensor, batch_index: Tensor, n_samples: int = 1000, n_samples_per_pass: int = 100,
        **covs: Tensor | None,
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
            parts.append(self.log_weights(x, batch_index, min(n_samples_per_pass, n_samples - start), **covs)[0])
        return torch.logsumexp(torch.cat(parts), 0) - math.log(n_samples)

    @torch.no_grad()
    def posterior_predictive(
        self, x: Tensor, batch_index: Tensor, n_samples: int = 1, **covs: Tensor | None
    ) -> Tensor:
        r"""Replicated counts :math:`\tilde x^{(s)} \sim p(x \mid z^{(s)}, \ell, s)`, :math:`z^{(s)} \sim q(z \mid x)`.

        ``x`` enters only through the guide and the observed library size; returns ``(B, G, n_samples)``."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        b = x.shape[0]
        with eval_mode(self):
            z = self._encode(x, batch_index, covs).sample((n_samples,))  # (S, B, D)
            x_rep = self._likelihood_per_draw(z, x, batch_index, covs).sample()
        return x_rep.reshape(n_samples, b, -1).permute(1, 2, 0)
