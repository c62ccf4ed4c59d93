r"""ELBO surgery (paper Table 1): how well a VAE with a given prior models the data, term by term.

For images :math:`x_{1..N}`, ``m`` draws :math:`z_{n,s} \sim q(z \mid x_n)` per image, and the prior :math:`p(z)`
(for the GMM/VMM the marginal mixture with predictive components):

* posterior predictive
  :math:`\log p(x \mid x) = \frac1N\sum_n [\operatorname{LSE}_s \log p(x_n\mid z_{n,s}) - \log m]`;
* evidence, importance sampled (IWAE, Burda et al.)
  :math:`\log p(x) \approx \frac1N\sum_n [\operatorname{LSE}_s (\log p(x_n\mid z_{n,s}) + \log p(z_{n,s})
  - \log q(z_{n,s}\mid x_n)) - \log m]`;
* negative distortion :math:`\mathbb E_q \log p(x\mid z) = \frac1{Nm}\sum_{n,s} \log p(x_n\mid z_{n,s})`;
* rate :math:`\overline{\mathrm{KL}} = \frac1{Nm}\sum_{n,s} [\log q(z_{n,s}\mid x_n) - \log p(z_{n,s})]`;
* ELBO = negative distortion - rate (:math:`\le` the IWAE estimate, image by image, by Jensen);
* marginal KL (Hoffman & Johnson) :math:`\mathrm{KL}(q(z)\,\|\,p(z))` with the aggregate posterior
  :math:`q(z) = \frac1N\sum_n q(z\mid x_n)`, averaged over the first ``m_agg`` draws per image:
  :math:`\frac1{N m_{agg}}\sum_{n,s}[\log q(z_{n,s}) - \log p(z_{n,s})]`;
* mutual information
  :math:`I[z;n] = \frac1{N m_{agg}}\sum_{n,s}[\log q(z_{n,s}\mid x_n) - \log q(z_{n,s})] \le \log N`,

so that, on the same draws, rate = marginal KL + :math:`I[z;n]` (Hoffman & Johnson's decomposition; the reported rate
uses all ``m`` draws, hence agrees up to Monte Carlo error).  Everything is vectorised over the ``m`` draws and
chunked over images; the aggregate posterior costs :math:`O(N^2 m_{agg} D^2)`.

The model must provide ``posterior(x)`` (a Gaussian :math:`q(z\mid x)`: ``MultivariateNormal`` or
``Normal(...).to_event(1)`` with batch shape ``(n,)``), ``log_likelihood(x, z)`` (broadcasting ``z`` of shape
``(m, n, D)`` against ``x`` of shape ``(n, P)``), ``prior`` and ``pseudo_encoder`` -- as
:class:`pyro_vmm.models.vae.ImageVAE` does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..utils import eval_mode

__all__ = ["ElboSurgery", "aggregate_posterior_terms", "elbo_surgery", "gaussian_loc_scale_tril"]

LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class ElboSurgery:
    """Per-image averages of the ELBO-surgery quantities (nats)."""

    log_px_given_x: float  #: posterior predictive log p(x|x)
    log_px: float  #: IWAE estimate of the evidence log p(x)
    neg_distortion: float  #: E_q log p(x|z)
    rate: float  #: mean KL(q(z|x) || p(z))
    elbo: float  #: neg_distortion - rate
    marginal_kl: float  #: KL(q(z) || p(z)) against the aggregate posterior
    mutual_information: float  #: I[z; n] <= log N
    log_n: float  #: log N, the upper bound of the mutual information
    n_data: int
    n_samples: int
    n_aggregate_samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def gaussian_loc_scale_tril(q: torch.distributions.Distribution) -> tuple[Tensor, Tensor]:
    """``(loc, scale_tril)`` of a ``MultivariateNormal`` or ``Independent(Normal, 1)``."""
    if isinstance(q, torch.distributions.MultivariateNormal):
        return q.loc, q.scale_tril
    if isinstance(q, torch.distributions.Independent) and isinstance(q.base_dist, torch.distributions.Normal):
        return q.base_dist.loc, torch.diag_embed(q.base_dist.scale)
    raise TypeError(f"posterior must be MultivariateNormal or Normal(...).to_event(1), got {type(q).__name__}")


def _log_normal_all(z: Tensor, loc: Tensor, inv_tril: Tensor, half_log_det: Tensor) -> Tensor:
    r""":math:`\log\mathcal N(z_s \mid m_j, L_jL_j^\top)` for every sample ``s`` (S, D) and component ``j`` (J, D);
    ``inv_tril`` holds :math:`L_j^{-1}`, ``half_log_det`` :math:`\sum_i\log L_{j,ii}`.  Shape (S, J)."""
    d = z.shape[-1]
    diff = z[:, None, :] - loc[None]  # (S, J, D)
    y = torch.einsum("jde,sje->sjd", inv_tril, diff)
    return -0.5 * y.pow(2).sum(-1) - half_log_det - 0.5 * d * LOG_2PI


def aggregate_posterior_terms(
    z: Tensor, owner: Tensor, loc: Tensor, scale_tril: Tensor, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    r"""For draws ``z`` (S, D) from :math:`q(z \mid x_{owner_s})`, return
    :math:`\log q(z_s \mid x_{owner_s})` and :math:`\log q(z_s) = \operatorname{LSE}_n \log q(z_s\mid x_n) - \log N`,
    with the aggregate posterior over all ``N`` Gaussians ``(loc, scale_tril)``.  Both shape (S,).
    ``chunk_size`` draws at a time (default: about 2e7 floats of working memory)."""
    n, d = loc.shape
    chunk_size = chunk_size or max(1, 20_000_000 // (n * d))
    eye = torch.eye(d, dtype=scale_tril.dtype, device=scale_tril.device).expand(n, d, d)
    inv_tril = torch.linalg.solve_triangular(scale_tril, eye, upper=False)
    half_log_det = scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    own, agg = [], []
    for i in range(0, z.shape[0], chunk_size):
        lq = _log_normal_all(z[i : i + chunk_size], loc, inv_tril, half_log_det)  # (s, N)
        own.append(lq.gather(1, owner[i : i + chunk_size, None]).squeeze(1))
        agg.append(torch.logsumexp(lq, dim=1) - math.log(n))
    return torch.cat(own), torch.cat(agg)


@torch.no_grad()
def elbo_surgery(
    model: torch.nn.Module,
    x: Tensor,
    n_samples: int = 100,
    n_aggregate_samples: int | None = None,
    chunk_size: int | None = None,
    seed: int | None = 0,
) -> ElboSurgery:
    """All Table-1 quantities of ``model`` on the images ``x`` (N, P); see the module docstring.

    ``n_samples`` is ``m`` (paper: 100); ``n_aggregate_samples`` (<= m, default ``min(10, m)``) draws per image enter
    the aggregate-posterior terms (the reference uses 100 on N = 10,000 images -- ~1e10 Gaussian densities; lower it on a CPU).
    ``chunk_size`` images are processed at a time (default: about 20,000 decoder evaluations per chunk).
    """
    if n_aggregate_samples is None:
        n_aggregate_samples = min(10, n_samples)
    if n_samples < 1 or not 1 <= n_aggregate_samples <= n_samples:
        raise ValueError(f"need 1 <= n_aggregate_samples <= n_samples, got {n_aggregate_samples}, {n_samples}")
    device = next(model.parameters()).device
    chunk = chunk_size or max(1, 20_000 // n_samples)
    sums = dict(pred=0.0, iwae=0.0, ll=0.0, kl=0.0)
    locs, trils, z_agg, lp_agg = [], [], [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(model):
        if seed is not None:
            torch.manual_seed(seed)
        prior = model.prior.latent_dist(model.pseudo_encoder)
        for i in range(0, x.shape[0], chunk):
            xc = x[i : i + chunk].to(device)
            q = model.posterior(xc)
            z = q.sample((n_samples,))  # (m, n, D)
            ll = model.log_likelihood(xc, z)  # (m, n)
            lq = q.log_prob(z)
            lp = prior.log_prob(z)
            log_m = math.log(n_samples)
            sums["pred"] += float((torch.logsumexp(ll, 0) - log_m).sum())
            sums["iwae"] += float((torch.logsumexp(ll + lp - lq, 0) - log_m).sum())
            sums["ll"] += float(ll.mean(0).sum())
            sums["kl"] += float((lq - lp).mean(0).sum())
            loc, tril = gaussian_loc_scale_tril(q)
            locs.append(loc.expand(xc.shape[0], -1))
            trils.append(tril.expand(xc.shape[0], -1, -1))
            z_agg.append(z[:n_aggregate_samples].transpose(0, 1))  # (n, m_agg, D)
            lp_agg.append(lp[:n_aggregate_samples].transpose(0, 1))
    n = x.shape[0]
    loc, tril = torch.cat(locs), torch.cat(trils)
    z_agg_t = torch.cat(z_agg).reshape(-1, loc.shape[-1])  # (N * m_agg, D), image-major
    owner = torch.arange(n, device=loc.device).repeat_interleave(n_aggregate_samples)
    log_q_own, log_q_agg = aggregate_posterior_terms(z_agg_t, owner, loc, tril)
    lp_flat = torch.cat(lp_agg).reshape(-1)
    neg_distortion, rate = sums["ll"] / n, sums["kl"] / n
    return ElboSurgery(
        log_px_given_x=sums["pred"] / n,
        log_px=sums["iwae"] / n,
        neg_distortion=neg_distortion,
        rate=rate,
        elbo=neg_distortion - rate,
        marginal_kl=float((log_q_agg - lp_flat).mean()),
        mutual_information=float((log_q_own - log_q_agg).mean()),
        log_n=math.log(n),
        n_data=n,
        n_samples=n_samples,
        n_aggregate_samples=n_aggregate_samples,
    )
