r"""VaDE (Jiang et al. 2017), the baseline of the VMM paper's Table 2, on the same networks as ``models/vae.py``.

Generative story, for an image :math:`x_n` (flattened, in [-1, 1]):

.. math::
    c_n &\sim \mathrm{Cat}(\pi), \qquad
    z_n \mid c_n \sim \mathcal N\big(\mu_{c_n}, \Lambda_{c_n}^{-1}\big), \qquad
    x_n \mid z_n \sim \mathcal N\big(f_\theta(z_n), \sigma^2 I\big),

with ``K`` components (10 by default, the number of classes, as VaDE does) and **no hyperpriors**: :math:`\pi`,
:math:`\mu_k` and the precision Cholesky factors :math:`L_k` (:math:`\Lambda_k = L_kL_k^\top`) are point estimates
trained jointly with the networks by one Adam optimiser.  The guide is

.. math:: q(z_n, c_n \mid x_n) = \mathcal N(z_n \mid m_\phi(x_n), S_\phi(x_n))\; q(c_n \mid x_n),\qquad
          q(c_n = k \mid x_n) = r_{nk} = p(c = k \mid \tilde z_n),\ \tilde z_n \sim q(z \mid x_n),

VaDE's approximation of :math:`q(c \mid x)` by the prior responsibilities at a (separate) posterior draw.  The
per-image ELBO (:meth:`VaDE.elbo`) is

.. math:: \mathrm{ELBO}_n = \log p(x_n \mid z_n) - \sum_k r_{nk}\,\mathrm{KL}\big(q(z\mid x_n)\,\|\,
          \mathcal N(\mu_k, \Lambda_k^{-1})\big) - \sum_k r_{nk}\log\frac{r_{nk}}{\pi_k},
          \qquad z_n \sim q(z \mid x_n),

with the Gaussian KLs in closed form.  :meth:`VaDE.model` / :meth:`VaDE.guide` are the same model and guide as Pyro
programs (``c`` enumerated in the guide): ``TraceEnum_ELBO`` on them is an unbiased estimate of the same objective.

Training (:func:`pyro_vmm.images.training.train_vade`): pre-train the auto-encoder on the reconstruction term only,
fit ``sklearn.mixture.GaussianMixture`` to one posterior draw of the training images and copy its parameters
(:meth:`VaDE.init_from_gaussian_mixture`), then optimise the ELBO over everything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor
from pyro.distributions import constraints
from torch.distributions import transform_to

from pyro_vmm.mixtures import gaussian_expected_log_lik
from pyro_vmm.priors import DIAG_SHIFT

from .vae import PAPER_HIDDEN, ImageVAE

__all__ = ["VaDE", "gaussian_kl_to_components"]


def gaussian_kl_to_components(loc: Tensor, scale_tril: Tensor, mu: Tensor, prec_tril: Tensor) -> Tensor:
    r""":math:`\mathrm{KL}(\mathcal N(m_n, S_n) \,\|\, \mathcal N(\mu_k, \Lambda_k^{-1}))` for all ``n, k``: (N, K).

    .. math:: \tfrac12\big[\operatorname{tr}(\Lambda_k S_n) + (\mu_k - m_n)^\top\Lambda_k(\mu_k - m_n) - D
              - \log|S_n| - \log|\Lambda_k|\big]

    with :math:`S_n = A_nA_n^\top` (``scale_tril``) and :math:`\Lambda_k = L_kL_k^\top` (``prec_tril``), so
    :math:`\operatorname{tr}(\Lambda_k S_n) = \|L_k^\top A_n\|_F^2`."""
    d = loc.shape[-1]
    trace = torch.einsum("kde,ndf->nkef", prec_tril, scale_tril).pow(2).sum((-2, -1))
    maha = torch.einsum("nkd,kde->nke", mu - loc[:, None, :], prec_tril).pow(2).sum(-1)
    log_det_s = 2.0 * scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (N,)
    log_det_p = 2.0 * prec_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (K,)
    return 0.5 * (trace + maha - d - log_det_s[:, None] - log_det_p[None, :])


class VaDE(ImageVAE):
    """VaDE: :class:`~pyro_vmm.models.vae.ImageVAE` networks with a plain (no hyperprior) ``K``-component GMM.

    The GMM is the ``gmm`` prior of :mod:`pyro_vmm.priors` built with ``inference='mle'``; here all its parameters
    are trained by the single VI optimiser together with the networks (:meth:`parameters`).
    """

    def __init__(
        self, n_input: int, n_latent: int = 10, n_components: int = 10, hidden: Sequence[int] = PAPER_HIDDEN
    ) -> None:
        super().__init__(n_input, n_latent, prior="gmm", n_components=n_components, hidden=hidden, inference="mle")
        self.config["model"] = "vade"

    @classmethod
    def from_data(cls, x_train: Tensor, prior: str = "gmm", n_components: int = 10, seed: int = 0, **kwargs):
        """Same signature as :meth:`ImageVAE.from_data` (``prior`` must be ``'gmm'``); no data are needed."""
        if prior != "gmm":
            raise ValueError(f"VaDE uses a Gaussian mixture prior; got prior={prior!r}")
        return cls(x_train.shape[1], n_components=n_components, **kwargs)

    # -- VaDE's objective ---------------------------------------------------------------------------------------
    def responsibilities(self, z: Tensor) -> Tensor:
        r"""Log responsibilities (..., K):
        :math:`\log p(c = k \mid z) = \log\pi_k + \log\mathcal N(z\mid\mu_k,\Lambda_k^{-1}) - \log p(z)`."""
        p = self.prior.mixture_params()
        return torch.log_softmax(gaussian_expected_log_lik(z, p.loc, p.prec_tril) + p.log_pi, dim=-1)

    def elbo(self, x: Tensor, kl_weight: float = 1.0) -> Tensor:
        """Per-image VaDE ELBO (B,) with one reparameterised draw for the reconstruction and an independent one
        for the responsibilities; ``kl_weight = 0`` gives the pre-training objective (reconstruction only)."""
        q = self.posterior(x)
        rec = self.log_likelihood(x, q.rsample())
        if kl_weight == 0.0:
            return rec
        p = self.prior.mixture_params()
        log_r = self.responsibilities(q.rsample())
        r = log_r.exp()
        kl_z = gaussian_kl_to_components(q.loc, q.scale_tril, p.loc, p.prec_tril)  # (B, K)
        kl = (r * (kl_z + log_r - p.log_pi)).sum(-1)
        return rec - kl_weight * kl

    def loss(self, x: Tensor, kl_weight: float = 1.0) -> Tensor:
        """Mean negative ELBO over the minibatch (the quantity minimised)."""
        return -self.elbo(x, kl_weight).mean()

    # -- the same model and guide as Pyro programs ------------------------------------------------------------------
    def model(self, x: Tensor) -> None:
        b = x.shape[0]
        p = self.prior.mixture_params()
        comps = p.predictive_components()
        with pyro.plate("data", b), poutine.scale(scale=1.0 / b):
            c = pyro.sample("c", dist.Categorical(logits=p.log_pi))
            z = pyro.sample("z", dist.MultivariateNormal(comps.loc[c], scale_tril=comps.scale_tril[c]))
            pyro.sample("x", self.likelihood(z), obs=x)

    def guide(self, x: Tensor) -> None:
        b = x.shape[0]
        with pyro.plate("data", b), poutine.scale(scale=1.0 / b):
            q = self.posterior(x)
            z = pyro.sample("z", q)
            # VaDE's q(c|x) = p(c | z~), z~ a draw independent of z (with z's shape, e.g. vectorised particles)
            log_r = self.responsibilities(q.rsample(z.shape[: z.dim() - 1 - len(q.batch_shape)]))
            pyro.sample("c", dist.Categorical(logits=log_r), infer={"enumerate": "parallel"})

    # -- initialisation from a fitted sklearn GaussianMixture -----------------------------------------------------
    @torch.no_grad()
    def init_from_gaussian_mixture(self, gmm) -> None:
        """Copy a fitted ``sklearn.mixture.GaussianMixture(covariance_type='full')`` into the prior.

        sklearn's ``precisions_cholesky_`` is *upper* triangular (:math:`\\Lambda = UU^\\top`); the prior holds the
        *lower* Cholesky factor, so we take :math:`L = \\operatorname{chol}(\\Lambda)` of ``precisions_``
        (the reference code assigns ``precisions_cholesky_`` directly and so keeps only its diagonal).
        """
        if getattr(gmm, "covariance_type", "full") != "full":
            raise ValueError("init_from_gaussian_mixture needs covariance_type='full'")
        prior = self.prior
        k, d = prior.n_components, prior.n_latent
        means = np.asarray(gmm.means_)
        if means.shape != (k, d):
            raise ValueError(f"the GaussianMixture has means of shape {means.shape}, expected ({k}, {d})")
        ref = prior.logits_unconstrained
        as_t = lambda a: torch.as_tensor(np.asarray(a), dtype=ref.dtype, device=ref.device)  # noqa: E731
        prec = as_t(gmm.precisions_)
        tril = torch.linalg.cholesky(0.5 * (prec + prec.mT))
        eye = torch.eye(d, dtype=ref.dtype, device=ref.device)
        raw = tril - DIAG_SHIFT * eye  # prec_tril = prec_tril_raw + 1e-5 I
        prior.prec_tril_raw_unconstrained.copy_(transform_to(constraints.softplus_lower_cholesky).inv(raw))
        prior.loc_unconstrained.copy_(as_t(means))
        weights = as_t(gmm.weights_).clamp_min(1e-12)
        prior.logits_unconstrained.copy_(weights.log() - weights.log().mean())
