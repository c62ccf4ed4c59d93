r"""totalVI with a VampPrior-Mixture (or N(0,I), VampPrior, GMM) latent prior, as a Pyro model/guide pair.

Generative story for cell :math:`n` of batch :math:`s_n` with RNA counts :math:`x_n \in \mathbb N^G` and protein
counts :math:`y_n \in \mathbb N^T` (Gayoso et al. 2021, "Joint probabilistic modeling of single-cell multi-omic data
with totalVI"; symbols as there):

.. math::

    z_n &\sim p(z)                                   && \text{the prior: normal | vampprior | gmm | vmm} \\
    \ell_n &= \textstyle\sum_g x_{ng}                  && \text{observed library size (not modelled)} \\
    \rho_n &= \operatorname{softmax} f_\rho(z_n, s_n),\ h^x_n = f_h(z_n, s_n)
           && \text{RNA frequencies and zero-inflation logits} \\
    x_{ng} &\sim \mathrm{NB}(\ell_n\rho_{ng}, \theta_g)\ \text{or}\ \mathrm{ZINB}(\ell_n\rho_{ng}, \theta_g,
           \operatorname{sigmoid}(h^x_{ng})) && \text{as } \texttt{models/scvi.py} \\
    \log\beta_{nt} &\sim \mathcal N\big(c_t^{(s_n)}, (d_t^{(s_n)})^2\big)
           && \text{protein background, } \beta_{nt} \sim \mathrm{LogNormal} \\
    \alpha_{nt} &= 1 + \operatorname{ReLU} f_\alpha(z_n, s_n)_t, \quad \pi_{nt} = \operatorname{sigmoid}
           f_\pi(z_n, s_n)_t && \text{foreground scale, background probability} \\
    y_{nt} &\sim \pi_{nt}\,\mathrm{NB}(\beta_{nt}, \phi_t) + (1 - \pi_{nt})\,\mathrm{NB}(\alpha_{nt}\beta_{nt}, \phi_t)
           && \text{(:class:`~pyro_vmm.distributions.ProteinCounts`)}

with per-gene and per-protein inverse dispersions :math:`\theta_g = e^{r_g}`, :math:`\phi_t = e^{r'_t}` and the
per-batch background prior :math:`(c^{(s)}, d^{(s)})` learned (initialised from the data by
:func:`protein_background_prior`, scvi-tools' empirical rule, or to :math:`c = 3, d = 1`).  The networks are
scvi-tools' :class:`~scvi.nn.DecoderTOTALVI` sub-networks, the batch one-hot injected in every layer;
``foreground_activation="softplus"`` replaces the ReLU of :math:`\alpha` by a softplus.

Amortised posterior (guide), as scvi-tools' ``TOTALVAE``:

.. math::

    q_\phi(z_n \mid x_n, y_n, s_n) &= \mathcal N(m_n, \operatorname{diag}\sigma_n^2), \quad
        \sigma^2 = e^{(\cdot)} + 10^{-4},\ \text{input } \big(\log(1 + \tfrac{x_n}{1 + \bar x_n}),
        \log(1 + \tfrac{y_n}{1 + \bar y_n}), \operatorname{onehot}(s_n)\big) \\
    q_\phi(\log\beta_n \mid z_n, s_n) &= \mathcal N\big(a(z_n, s_n), \operatorname{diag} b(z_n, s_n)^2\big),
        \quad b = \operatorname{softplus}(\cdot) + 10^{-8},

:math:`\bar x_n, \bar y_n` the cell's mean count; the background posterior reads :math:`z_n \sim q` (so it depends on
:math:`x_n, y_n, s_n` through :math:`z_n`), scvi-tools' ``py_back_*`` networks of the decoder.

Pseudo-inputs (``vmm``, ``vampprior``): :math:`u_k = (\tilde x_k, \tilde y_k, \tilde s_k)`, RNA and protein counts
:math:`\operatorname{softplus}(v_k)` and a soft batch vector :math:`\operatorname{softmax}(w_k)` (without
``encode_covariates``: no batch part); they pass through the encoder (eval mode) to give :math:`q_\phi(\mu_k \mid
u_k)`.  The prior's raw ``pseudo_inputs`` have shape ``(K, G + T + n_batch_input)``.

ELBO per cell (``model`` and ``guide`` scale every site by :math:`1/B`, so ``TraceMeanField_ELBO`` returns the batch
mean of the negative ELBO):
:math:`\mathbb E_q[\log p(x_n \mid z_n) + \log p(y_n \mid z_n, \beta_n)] - \mathrm{KL}(q(z_n) \,\|\, p(z))
- \mathrm{KL}(q(\log\beta_n \mid z_n) \,\|\, p(\log\beta_n \mid s_n))`.  scvi-tools' ``TOTALVAE`` also learns a
per-batch protein efficiency (LogNormal(0, 1) prior) and adds :math:`-10^{-3}\log\pi_{nt}` to its loss; neither is
part of the paper's model nor of this one.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from scvi import REGISTRY_KEYS
from scvi.nn import DecoderTOTALVI
from torch import Tensor, nn

from pyro_vmm.distributions import ProteinCounts
from pyro_vmm.models._layers import (
    DECODER_NORM, CountsModule, check_choice, check_pseudo_inputs, gaussian_encoder,
)
from pyro_vmm.models.scvi import VAR_EPS, GeneCounts, GeneLikelihood, counts_to_pseudo_inputs
from pyro_vmm.priors import build_prior
from pyro_vmm.utils import eval_mode

__all__ = ["VMMTOTALVIModule", "protein_background_prior"]

ForegroundActivation = Literal["relu", "softplus"]


def protein_background_prior(
    y: np.ndarray, batch: np.ndarray, n_batch: int, n_cells: int = 100, seed: int | None = 0
) -> tuple[np.ndarray, np.ndarray]:
    r"""Empirical initial background prior :math:`(c, d)`, each ``(T, n_batch)``, by scvi-tools' rule.

    Per batch, for ``n_cells`` cells drawn with replacement, fit a two-component Gaussian mixture to the cell's
    :math:`\log(1 + y_{nt})` over proteins and keep the lower component's mean :math:`m_n` and standard deviation
    :math:`v_n` (an all-zero cell: :math:`m_n = 0, v_n = 0.05`); then :math:`c = \operatorname{mean}_n m_n` and
    :math:`d = \sqrt{\sum_n v_n^2} / n_{\mathrm{cells}}`, the same for every protein.  Batches without cells get
    :math:`(0, 1)`."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    y = np.asarray(y, dtype=np.float64)
    batch = np.asarray(batch).ravel()
    rng = np.random.default_rng(seed)
    means, scales = np.zeros(n_batch), np.ones(n_batch)
    for b in range(n_batch):
        cells = y[batch == b]
        if cells.shape[0] == 0:
            continue
        mus, sds = [], []
        for row in cells[rng.choice(cells.shape[0], size=n_cells)]:
            gmm = GaussianMixture(n_components=2, random_state=0)
            with warnings.catch_warnings():
                warnings.simplefilter("error", ConvergenceWarning)
                try:
                    gmm.fit(np.log1p(row).reshape(-1, 1))
                except ConvergenceWarning:
                    mus.append(0.0)
                    sds.append(0.05)
                    continue
            low = int(np.argmin(gmm.means_.ravel()))
            mus.append(float(gmm.means_.ravel()[low]))
            sds.append(float(np.sqrt(gmm.covariances_.ravel()[low])))
        means[b] = np.mean(mus)
        scales[b] = np.sqrt(np.sum(np.square(sds))) / n_cells
    t = y.shape[1]
    return np.tile(means, (t, 1)), np.tile(scales, (t, 1))


class VMMTOTALVIModule(CountsModule):
    r"""totalVI as a Pyro program with a pluggable latent prior (see the module docstring for the math).

    Parameters
    ----------
    n_input_genes, n_input_proteins
        ``G`` and ``T``.
    n_batch
        Number of batches (1 for single-batch data).
    n_latent, n_hidden, n_layers_encoder, n_layers_decoder, dropout_rate_encoder, dropout_rate_decoder
        Network sizes, as ``scvi.model.TOTALVI`` (defaults equal).
    gene_likelihood
        ``"nb"`` (totalVI's default) or ``"zinb"``.
    prior, n_clusters, inference
        The latent prior (``"normal" | "vampprior" | "gmm" | "vmm"``), ``K`` and the EM mode (see
        :mod:`pyro_vmm.priors`).
    pseudo_inputs
        ``(K, G + T)`` RNA-then-protein counts of ``K`` cells, the initial pseudo-inputs (``vmm``/``vampprior``).
    protein_background_prior_mean, protein_background_prior_scale
        ``(T, n_batch)`` initial :math:`c` and :math:`d` (e.g. from :func:`protein_background_prior`); ``None``:
        :math:`c = 3`, :math:`d = 1`.
    encode_covariates
        Give the batch to the encoder (``True``, as ``TOTALVI``); the decoder always reads it.
    foreground_activation
        :math:`\alpha = 1 + \operatorname{ReLU}(\cdot)` (scvi-tools) or :math:`1 + \operatorname{softplus}(\cdot)`.
    """

    def __init__(
        self,
        n_input_genes: int,
        n_input_proteins: int,
        n_batch: int = 1,
        n_latent: int = 20, n_hidden: int = 256,
        n_layers_encoder: int = 2, n_layers_decoder: int = 1,
        dropout_rate_encoder: float = 0.2, dropout_rate_decoder: float = 0.2,
        gene_likelihood: GeneLikelihood = "nb",
        prior: str = "vmm", n_clusters: int = 100, pseudo_inputs: Tensor | None = None, inference: str = "map-dp",
        protein_background_prior_mean: np.ndarray | Tensor | None = None,
        protein_background_prior_scale: np.ndarray | Tensor | None = None,
        encode_covariates: bool = True,
        foreground_activation: ForegroundActivation = "relu",
    ) -> None:
        super().__init__()
        check_choice("gene_likelihood", gene_likelihood, ("zinb", "nb"))
        check_choice("foreground_activation", foreground_activation, ("relu", "softplus"))
        if min(int(n_input_genes), int(n_input_proteins), int(n_batch)) < 1:
            raise ValueError(
                f"need n_input_genes, n_input_proteins, n_batch >= 1, got {n_input_genes}, {n_input_proteins}, "
                f"{n_batch}"
            )
        self.n_input_genes, self.n_input_proteins = int(n_input_genes), int(n_input_proteins)
        self.n_batch, self.n_latent = int(n_batch), int(n_latent)
        self.gene_likelihood = gene_likelihood
        self.encode_covariates = bool(encode_covariates)
        #: width of the batch part of the encoder input (a 1-level batch is dropped, as FCLayers does)
        self.n_batch_input = self.n_batch if self.n_batch > 1 and self.encode_covariates else 0
        n_in = self.n_input_genes + self.n_input_proteins

        # q(z | x, y, s): scvi-tools' EncoderTOTALVI z-branch (batch one-hot injected into every layer)
        self.encoder, self.mean_encoder, self.var_encoder = gaussian_encoder(
            n_in, n_hidden, self.n_latent, n_layers_encoder, dropout_rate_encoder,
            n_cat_list=[self.n_batch] if self.encode_covariates else None,
        )
        # p(x, y | z, beta, s) and q(log beta | z, s): scvi-tools' DecoderTOTALVI networks
        self.decoder = DecoderTOTALVI(
            self.n_latent,
            self.n_input_genes,
            self.n_input_proteins,
            n_cat_list=[self.n_batch],
            n_layers=n_layers_decoder,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate_decoder,
            **DECODER_NORM,
        )
        if foreground_activation == "softplus":
            self.decoder.py_fore_scale_decoder.fc_layers[0][3] = nn.Softplus()
        #: log inverse dispersions r_g (genes) and r'_t (proteins), initialised as scvi-tools'
        self.px_r = nn.Parameter(torch.randn(self.n_input_genes))
        self.py_r = nn.Parameter(2.0 * torch.rand(self.n_input_proteins))
        #: background prior c_t^(s) and log d_t^(s), (T, n_batch)
        shape = (self.n_input_proteins, self.n_batch)
        if protein_background_prior_mean is None:
            mean, scale = torch.full(shape, 3.0), torch.ones(shape)
        else:
            mean = torch.as_tensor(np.asarray(protein_background_prior_mean), dtype=torch.get_default_dtype())
            scale = torch.as_tensor(np.asarray(protein_background_prior_scale), dtype=torch.get_default_dtype())
            if mean.shape != shape or scale.shape != shape:
                raise ValueError(
                    f"protein background prior mean/scale have shapes {tuple(mean.shape)}/{tuple(scale.shape)}, "
                    f"expected (n_proteins, n_batch) = {shape}"
                )
        self.background_pro_alpha = nn.Parameter(mean.clone())
        self.background_pro_log_beta = nn.Parameter(torch.log(scale))

        counts = check_pseudo_inputs(
            prior, pseudo_inputs, (n_clusters, n_in), "n_genes + n_proteins",
            "the (K, G + T) RNA-then-protein counts of K random cells",
        )
        raw = None if counts is None else counts_to_pseudo_inputs(counts, self.n_batch_input)
        self.prior = build_prior(prior, self.n_latent, n_components=n_clusters, pseudo_inputs=raw, inference=inference)

    # ------------------------------------------------------------------------------------------- scvi-tools glue
    @staticmethod
    def _get_fn_args_from_batch(tensor_dict: dict[str, Tensor]) -> tuple[tuple[Tensor, Tensor], dict]:
        """``(x, batch_index), {"y": proteins, "nonzero": (rows, cols)}`` (the non-zero positions of ``x`` when the
        loader gives them): the call convention ``f(x, batch_index, **fields)`` of :mod:`pyro_vmm.scvi`."""
        return CountsModule._batch_args(tensor_dict, {"y": tensor_dict[REGISTRY_KEYS.PROTEIN_EXP_KEY]})

    # ------------------------------------------------------------------------------------------- networks
    def _posterior(self, x: Tensor, y: Tensor, batch: Tensor | None) -> dist.Independent:
        r""":math:`q(z)` from counts ``x`` ``(B, G)``, ``y`` ``(B, T)`` and a (soft) batch one-hot ``(B, S)``."""
        xn = torch.log1p(x / (1.0 + x.mean(-1, keepdim=True)))
        yn = torch.log1p(y / (1.0 + y.mean(-1, keepdim=True)))
        cats = (batch,) if self.encode_covariates else ()
        h = self.encoder(torch.cat([xn, yn], dim=-1), *cats)
        scale = (torch.exp(self.var_encoder(h)) + VAR_EPS).sqrt()
        return dist.Normal(self.mean_encoder(h), scale).to_event(1)

    def _onehot(self, batch_index: Tensor) -> Tensor:
        return F.one_hot(batch_index.reshape(-1).long(), self.n_batch).to(self.px_r.dtype)

    def encode(self, x: Tensor, batch_index: Tensor, y: Tensor) -> dist.Independent:
        r""":math:`q_\phi(z \mid x, y, s)`, batch shape ``(B,)``, event ``(D,)`` (current train/eval mode)."""
        return self._posterior(x, y, self._onehot(batch_index))

    def pseudo_counts(self, u_raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r"""Pseudo RNA and protein counts :math:`\operatorname{softplus}(v)` and the soft batch vector
        :math:`\operatorname{softmax}(w)` (uniform when the encoder reads no batch: it is then unused)."""
        g, t = self.n_input_genes, self.n_input_proteins
        counts = F.softplus(u_raw[..., : g + t])
        if self.n_batch_input:
            batch = torch.softmax(u_raw[..., g + t :], dim=-1)
        else:
            batch = u_raw.new_full((*u_raw.shape[:-1], self.n_batch), 1.0 / self.n_batch)
        return counts[..., :g], counts[..., g:], batch

    def pseudo_posterior(self, u_raw: Tensor) -> dist.Independent:
        r""":math:`q_\phi(\mu_k \mid u_k)` for raw pseudo-inputs, encoder in eval mode."""
        x, y, batch = self.pseudo_counts(u_raw)
        with eval_mode(self.encoder):
            return self._posterior(x, y, batch)

    def background_prior(self, batch_index: Tensor) -> dist.Independent:
        r""":math:`p(\log\beta_n \mid s_n) = \mathcal N(c^{(s_n)}, \operatorname{diag} (d^{(s_n)})^2)`, event ``(T,)``."""
        b = batch_index.reshape(-1).long()
        return dist.Normal(self.background_pro_alpha.T[b], torch.exp(self.background_pro_log_beta).T[b]).to_event(1)

    def background_posterior(self, z: Tensor, batch_index: Tensor) -> dist.Independent:
        r""":math:`q_\phi(\log\beta_n \mid z_n, s_n) = \mathcal N(a, \operatorname{diag} b^2)`, event ``(T,)``."""
        dec, s = self.decoder, batch_index.reshape(-1, 1).long()
        h = torch.cat([dec.py_back_decoder(z, s), z], dim=-1)
        scale = dec.activation_function_bg(dec.py_back_mean_log_beta(h, s)) + 1e-8
        return dist.Normal(dec.py_back_mean_log_alpha(h, s), scale).to_event(1)

    def decode(self, z: Tensor, batch_index: Tensor) -> dict[str, Tensor | None]:
        r"""Decoder outputs: ``scale_logits`` (pre-softmax :math:`\rho`), ``gate_logits`` (:math:`h^x`, ZINB only),
        ``foreground_scale`` :math:`\alpha` and ``mixing_logits`` (logit of :math:`\pi`), each ``(B, .)``."""
        dec, s = self.decoder, batch_index.reshape(-1, 1).long()
        px = torch.cat([dec.px_decoder(z, s), z], dim=-1)
        fore = torch.cat([dec.py_fore_decoder(z, s), z], dim=-1)
        mix = torch.cat([dec.sigmoid_decoder(z, s), z], dim=-1)
        return {
            "scale_logits": dec.px_scale_decoder(px, s),
            "gate_logits": dec.px_dropout_decoder_gene(mix, s) if self.gene_likelihood == "zinb" else None,
            "foreground_scale": dec.py_fore_scale_decoder(fore, s) + 1.0 + 1e-8,
            "mixing_logits": dec.py_background_decoder(mix, s),
        }

    def likelihoods(
        self,
        z: Tensor,
        log_background: Tensor,
        library: Tensor,
        batch_index: Tensor,
        nonzero: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[GeneCounts, ProteinCounts]:
        r""":math:`p(x \mid z, \ell, s)` (event ``(G,)``) and :math:`p(y \mid z, \beta, s)` (event ``(T,)``);
        ``library`` is :math:`\ell` ``(B, 1)``, ``log_background`` :math:`\log\beta` ``(B, T)``."""
        out = self.decode(z, batch_index)
        px = GeneCounts(out["scale_logits"], torch.log(library), self.px_r, out["gate_logits"], nonzero)
        py = ProteinCounts(log_background, out["foreground_scale"], self.py_r, out["mixing_logits"])
        return px, py

    # ------------------------------------------------------------------------------------------- Pyro programs
    # every method takes ``(x, batch_index, *, y)`` -- the call ``f(x, batch_index, **fields)`` of pyro_vmm.scvi
    def model(
        self, x: Tensor, batch_index: Tensor, *, y: Tensor, nonzero: tuple[Tensor, Tensor] | None = None
    ) -> None:
        """``x`` ``(B, G)`` RNA counts, ``batch_index`` ``(B, 1)`` codes, ``y`` ``(B, T)`` protein counts;
        ``nonzero``: the ``(rows, cols)`` of ``x``'s non-zero counts, when known."""
        b = x.shape[0]
        library = x.sum(-1, keepdim=True)
        with pyro.plate("data", b), poutine.scale(scale=1.0 / b):
            z = pyro.sample("z", self.prior.latent_dist(self.pseudo_posterior))
            log_beta = pyro.sample("log_beta", self.background_prior(batch_index))
            px, py = self.likelihoods(z, log_beta, library, batch_index, nonzero)
            pyro.sample("x", px, obs=x)
            pyro.sample("y", py, obs=y)

    def guide(
        self, x: Tensor, batch_index: Tensor, *, y: Tensor, nonzero: tuple[Tensor, Tensor] | None = None
    ) -> None:
        b = x.shape[0]
        with pyro.plate("data", b), poutine.scale(scale=1.0 / b):
            z = pyro.sample("z", self.encode(x, batch_index, y))
            pyro.sample("log_beta", self.background_posterior(z, batch_index))

    # ------------------------------------------------------------------------------------------- inference helpers
    @torch.no_grad()
    def latent_mean(
        self, x: Tensor, batch_index: Tensor, *, y: Tensor, nonzero: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Posterior mean E_q[z | x, y, s] (networks in eval mode)."""
        with eval_mode(self):
            return self.encode(x, batch_index, y).mean

    @torch.no_grad()
    def latent_moments(self, x: Tensor, batch_index: Tensor, *, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of :math:`q(z \\mid x, y, s)`, each ``(B, D)`` (networks in eval mode)."""
        with eval_mode(self):
            q = self.encode(x, batch_index, y).base_dist
            return q.loc, q.scale.square()

    @torch.no_grad()
    def latent_sample(self, x: Tensor, batch_index: Tensor, *, y: Tensor) -> Tensor:
        """One draw :math:`z \\sim q(z \\mid x, y, s)` per cell, ``(B, D)`` (networks in eval mode)."""
        with eval_mode(self):
            return self.encode(x, batch_index, y).sample()

    @torch.no_grad()
    def cluster_probs(
        self, x: Tensor, batch_index: Tensor, *, y: Tensor, give_mean: bool = True, mc_samples: int = 100
    ) -> Tensor:
        r""":math:`q(c \mid z)`, ``(B, K)`` (networks in eval mode): at the posterior mean :math:`z` (``give_mean``),
        or averaged over ``mc_samples`` draws :math:`z \sim q(z \mid x, y, s)`."""
        with eval_mode(self):
            return self._posterior_cluster_probs(self.encode(x, batch_index, y), give_mean, mc_samples)

    def _draws(
        self, x: Tensor, batch_index: Tensor, y: Tensor, n_samples: int
    ) -> tuple[dist.Independent, Tensor, Tensor, Tensor]:
        r"""``q(z)``, ``n_samples`` draws :math:`z_s \sim q` flattened draw-major to ``(S * B, D)`` (row ``s * B + n``
        is cell ``n``'s draw ``s``), and the batch codes and library sizes repeated to match."""
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        q = self.encode(x, batch_index, y)
        z = q.rsample((int(n_samples),))
        batch = batch_index.reshape(-1, 1).repeat(int(n_samples), 1)
        library = x.sum(-1, keepdim=True).repeat(int(n_samples), 1)
        return q, z.reshape(-1, z.shape[-1]), batch, library

    @torch.no_grad()
    def log_weights(self, x: Tensor, batch_index: Tensor, n_samples: int, *, y: Tensor) -> tuple[Tensor, Tensor]:
        r"""Importance log-weights :math:`\log w_s = \log p(x, y \mid z_s, \beta_s, s) + \log p(z_s) +
        \log p(\log\beta_s \mid s) - \log q(z_s \mid x, y, s) - \log q(\log\beta_s \mid z_s, s)` and the
        log-likelihood terms :math:`\log p(x, y \mid z_s, \beta_s, s)`, both ``(n_samples, B)``, for
        :math:`(z_s, \log\beta_s) \sim q` (networks in eval mode)."""
        b = x.shape[0]
        with eval_mode(self):
            q, z, batch, library = self._draws(x, batch_index, y, n_samples)
            q_beta = self.background_posterior(z, batch)
            log_beta = q_beta.sample()
            px, py = self.likelihoods(z, log_beta, library, batch)
            log_lik = px.log_prob(x.repeat(n_samples, 1)) + py.log_prob(y.repeat(n_samples, 1))
            log_prior = self.prior.latent_dist(self.pseudo_posterior).log_prob(z)
            log_prior = log_prior + self.background_prior(batch).log_prob(log_beta)
            log_q = q.log_prob(z.reshape(n_samples, b, -1)).reshape(-1) + q_beta.log_prob(log_beta)
            return (log_lik + log_prior - log_q).reshape(n_samples, b), log_lik.reshape(n_samples, b)

    @torch.no_grad()
    def marginal_ll(
        self, x: Tensor, batch_index: Tensor, n_samples: int = 1000, n_samples_per_pass: int = 100, *, y: Tensor
    ) -> Tensor:
        r"""Importance-sampled :math:`\log p(x, y \mid s) \approx \operatorname{LSE}_s \log w_s - \log S` per cell,
        ``(B,)``, ``n_samples_per_pass`` draws at a time (see :meth:`log_weights`)."""
        if n_samples < 1 or n_samples_per_pass < 1:
            raise ValueError(f"need n_samples, n_samples_per_pass >= 1, got {n_samples}, {n_samples_per_pass}")
        parts = [
            self.log_weights(x, batch_index, min(n_samples_per_pass, n_samples - start), y=y)[0]
            for start in range(0, n_samples, n_samples_per_pass)
        ]
        return torch.logsumexp(torch.cat(parts), 0) - float(np.log(n_samples))

    @torch.no_grad()
    def posterior_predictive(
        self, x: Tensor, batch_index: Tensor, n_samples: int = 1, *, y: Tensor, proteins: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""Replicated counts :math:`(\tilde x, \tilde y) \sim p(x, y \mid z, \beta, \ell, s)`, :math:`(z, \log\beta)
        \sim q`: RNA ``(B, G, n_samples)`` (the contract of :mod:`pyro_vmm.scvi`), and with ``proteins`` also the
        protein counts ``(B, T, n_samples)``  (networks in eval mode)."""
        b = x.shape[0]
        with eval_mode(self):
            _, z, batch, library = self._draws(x, batch_index, y, n_samples)
            log_beta = self.background_posterior(z, batch).sample()
            px, py = self.likelihoods(z, log_beta, library, batch)
            x_rep = px.sample().reshape(n_samples, b, -1).permute(1, 2, 0)
            if not proteins:
                return x_rep
            return x_rep, py.sample().reshape(n_samples, b, -1).permute(1, 2, 0)

    @torch.no_grad()
    def normalized_expression(
        self,
        x: Tensor, batch_index: Tensor,
        n_samples: int = 1, batch_codes: tuple[int | None, ...] = (None,),
        *,
        y: Tensor,
        include_protein_background: bool = False,
        sample_protein_mixing: bool = False,
    ) -> tuple[Tensor, Tensor]:
        r"""Decoded RNA frequencies :math:`\rho` and protein expression, each ``(n_samples, B, .)``, for
        :math:`z \sim q(z \mid x, y, s)`, :math:`\log\beta \sim q(\log\beta \mid z, s')`, averaged over the batches
        :math:`s'` in ``batch_codes`` (``None``: the cell's own), as scvi-tools' ``TOTALVI``:

        .. math::

            \text{protein}_{nt} = (1 - \pi_{nt})\,\alpha_{nt}\beta_{nt}
                \;[\, + \pi_{nt}\beta_{nt} \text{ with } \texttt{include_protein_background} \,],

        the foreground mean without the background; ``sample_protein_mixing`` replaces :math:`\pi_{nt}` by a draw
        of :math:`\mathrm{Bernoulli}(\pi_{nt})`.  Networks in eval mode."""
        b = x.shape[0]
        with eval_mode(self):
            _, z, own, _ = self._draws(x, batch_index, y, n_samples)
            rho, protein = 0.0, 0.0
            for code in batch_codes:
                batch = own if code is None else torch.full_like(own, int(code))
                out = self.decode(z, batch)
                beta = torch.exp(self.background_posterior(z, batch).sample())
                pi = torch.sigmoid(out["mixing_logits"])
                if sample_protein_mixing:
                    pi = torch.bernoulli(pi)
                value = (1.0 - pi) * out["foreground_scale"] * beta
                if include_protein_background:
                    value = value + pi * beta
                rho = rho + torch.softmax(out["scale_logits"], -1)
                protein = protein + value
        k = len(batch_codes)
        return (rho / k).reshape(n_samples, b, -1), (protein / k).reshape(n_samples, b, -1)
