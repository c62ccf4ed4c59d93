r"""The image VAE of the VMM paper (Stirn & Knowles 2024, section 4), as a Pyro model/guide pair.

Generative story, for an image :math:`x_n \in [-1, 1]^P` (flattened), :math:`n = 1..N`:

.. math::
    z_n &\sim p(z) \quad\text{(one of the four priors: } \mathcal N(0, I)\text{, VampPrior, DP-GMM, VMM)}\\
    x_n \mid z_n &\sim \mathcal N\big(f_\theta(z_n), \sigma^2 I_P\big),
    \qquad \sigma = \operatorname{softplus}(s),\ \sigma_{\text{init}} = 1,

with a decoder MLP :math:`f_\theta` (hidden sizes 2000-500-500, ReLU, linear output).  The guide is the amortised
full-covariance Gaussian

.. math:: q_\phi(z_n \mid x_n) = \mathcal N\big(m_\phi(x_n), L_\phi(x_n) L_\phi(x_n)^\top\big),

an encoder MLP (500-500-2000, ReLU) whose last layer gives :math:`m` (``D`` values) and the lower triangle of
:math:`L` (``D(D+1)/2`` values; diagonal ``softplus(.) + 1e-5``).  For the VampPrior and the VMM the same encoder maps
the ``K`` pseudo-inputs :math:`u_k` (initialised to ``K`` random training images) to
:math:`q_\phi(\mu_k \mid u_k)`, always in eval mode (:meth:`ImageVAE.pseudo_posterior`).

The model scales every log-density by ``1/B`` (``B`` = minibatch size), so ``-ELBO`` is the paper's per-image loss
:math:`\frac1B\sum_n -\mathrm{ELBO}_n`.  Train with :class:`pyro_vmm.AlternatingSVI` (VI step on the networks, EM step
on the GMM/VMM prior) or :func:`pyro_vmm.images.training.train_image_model`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor, nn

from pyro_vmm.priors import build_prior
from pyro_vmm.utils import eval_mode

__all__ = ["PAPER_HIDDEN", "ImageVAE", "TriLGaussianEncoder", "mlp"]

#: the paper's encoder hidden sizes (the decoder mirrors them)
PAPER_HIDDEN = (500, 500, 2000)
#: diagonal shift of the posterior scale_tril (FillScaleTriL default in the reference code)
SCALE_DIAG_SHIFT = 1e-5


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class TriLGaussianEncoder(nn.Module):
    r""":math:`x \mapsto \mathcal N(m(x), L(x)L(x)^\top)` with ``L`` lower-triangular, ``diag = softplus + 1e-5``."""

    def __init__(self, n_input: int, n_latent: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.n_latent = n_latent
        self.net = mlp([n_input, *hidden, n_latent + n_latent * (n_latent + 1) // 2])
        rows, cols = torch.tril_indices(n_latent, n_latent)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)

    def forward(self, x: Tensor) -> dist.MultivariateNormal:
        d = self.n_latent
        out = self.net(x)
        loc, raw = out[..., :d], out[..., d:]
        tril = raw.new_zeros(raw.shape[:-1] + (d, d))
        tril[..., self._rows, self._cols] = raw
        diag = nn.functional.softplus(tril.diagonal(dim1=-2, dim2=-1)) + SCALE_DIAG_SHIFT
        tril = tril.tril(-1) + torch.diag_embed(diag)
        return dist.MultivariateNormal(loc, scale_tril=tril)


class ImageVAE(nn.Module):
    """The paper's image VAE with any of the four priors (see the module docstring).

    Parameters
    ----------
    n_input
        Pixels per image ``P``.
    n_latent
        Latent dimension ``D`` (paper: 10 for MNIST, 30 for Fashion-MNIST).
    prior
        ``'normal' | 'vampprior' | 'gmm' | 'vmm'``.
    n_components
        ``K`` (paper: 100).
    pseudo_inputs
        ``(K, P)`` initial pseudo-inputs (VampPrior/VMM), e.g. ``K`` random training images
        (:meth:`from_data` draws them).
    hidden
        Encoder hidden sizes; the decoder uses them reversed (paper: 500-500-2000).
    inference
        GMM/VMM hyperprior mode: ``'map-dp'`` (paper), ``'map'`` or ``'mle'``.
    """

    def __init__(
        self,
        n_input: int,
        n_latent: int = 10,
        prior: str = "vmm",
        n_components: int = 100,
        pseudo_inputs: Tensor | None = None,
        hidden: Sequence[int] = PAPER_HIDDEN,
        inference: str = "map-dp",
        init_sigma: float = 1.0,
    ) -> None:
        super().__init__()
        if not (math.isfinite(init_sigma) and init_sigma > 0):
            raise ValueError(f"init_sigma must be a finite number > 0, got {init_sigma!r}; e.g. init_sigma=1.0")
        self.config = dict(
            n_input=int(n_input),
            n_latent=int(n_latent),
            prior=str(prior),
            n_components=int(n_components),
            hidden=[int(h) for h in hidden],
            inference=str(inference),
            init_sigma=float(init_sigma),
        )
        if prior in ("vampprior", "vmm") and pseudo_inputs is None:
            raise ValueError(f"prior {prior!r} needs pseudo_inputs of shape (K, {n_input}); use ImageVAE.from_data")
        if pseudo_inputs is not None and pseudo_inputs.shape[1:] != (n_input,):
            raise ValueError(f"pseudo_inputs must have shape (K, {n_input}), got {tuple(pseudo_inputs.shape)}")
        self.encoder = TriLGaussianEncoder(n_input, n_latent, hidden)
        self.decoder = mlp([n_latent, *reversed(list(hidden)), n_input])
        # sigma = softplus(raw), initialised to init_sigma (the paper: 1)
        self.scale_raw = nn.Parameter(torch.tensor(math.log(math.expm1(float(init_sigma)))))
        self.prior = build_prior(prior, n_latent, n_components, pseudo_inputs=pseudo_inputs, inference=inference)

    @classmethod
    def from_data(cls, x_train: Tensor, prior: str = "vmm", n_components: int = 100, seed: int = 0, **kwargs):
        """Build with pseudo-inputs set to ``K`` distinct random rows of ``x_train`` (labels are never used)."""
        pseudo = None
        if prior in ("vampprior", "vmm"):
            if n_components > x_train.shape[0]:
                raise ValueError(f"K = {n_components} pseudo-inputs but only {x_train.shape[0]} training images")
            idx = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(seed))[:n_components]
            pseudo = x_train[idx].detach().cpu().clone()
        return cls(x_train.shape[1], prior=prior, n_components=n_components, pseudo_inputs=pseudo, **kwargs)

    # -- networks -------------------------------------------------------------------------------------------------
    @property
    def sigma(self) -> Tensor:
        return nn.functional.softplus(self.scale_raw)

    def posterior(self, x: Tensor) -> dist.MultivariateNormal:
        r""":math:`q_\phi(z \mid x)`, batch shape ``x.shape[:-1]``."""
        return self.encoder(x)

    def pseudo_posterior(self, u: Tensor) -> dist.MultivariateNormal:
        r""":math:`q_\phi(\mu \mid u)` for pseudo-inputs ``u`` (K, P), encoder in eval mode."""
        with eval_mode(self.encoder):
            return self.encoder(u)

    def likelihood(self, z: Tensor) -> dist.Independent:
        r""":math:`p_\theta(x \mid z) = \mathcal N(f_\theta(z), \sigma^2 I)`, event shape ``(P,)``."""
        loc = self.decoder(z)
        return dist.Normal(loc, self.sigma.expand_as(loc)).to_event(1)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        r""":math:`\log p_\theta(x \mid z)`, broadcasting ``z`` (..., D) against ``x`` (P,) or (..., P)."""
        return self.likelihood(z).log_prob(x)

    @property
    def pseudo_encoder(self):
        """The encoder callable the prior needs (``None`` for the normal and GMM priors)."""
        return self.pseudo_posterior if self.prior.uses_encoder else None

    # -- Pyro programs ------------------------------------------------------------------------------------------
    def model(self, x: Tensor) -> None:
        b = x.shape[0]
        with pyro.plate("data", b), poutine.scale(scale=1.0 / b):
            z = pyro.sample("z", self.prior.latent_dist(self.pseudo_encoder))
            pyro.sample("x", self.likelihood(z), obs=x)

    def guide(self, x: Tensor) -> None:
        b = x.shape[0]
        with pyro.plate("data", b), poutine.scale(scale=1.0 / b):
            pyro.sample("z", self.posterior(x))

    # -- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Decoder mean :math:`f_\\theta(z)` (eval mode)."""
        with eval_mode(self):
            return self.decoder(z)
