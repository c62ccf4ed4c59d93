r"""Clustering evaluation of the image models (paper protocol): one posterior sample :math:`z_n \sim q(z \mid x_n)`
per image (or the posterior mean), responsibilities :math:`q(c = k \mid z_n)` from the prior, then
:func:`pyro_vmm.metrics.clustering_scores`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..metrics import ClusteringScores, clustering_scores
from ..utils import eval_mode

__all__ = ["cluster_probabilities", "evaluate_clustering", "latent_representation"]


def _chunks(x: Tensor, size: int):
    for i in range(0, x.shape[0], size):
        yield x[i : i + size]


@torch.no_grad()
def latent_representation(
    module: torch.nn.Module, x: Tensor, *, sample: bool = True, batch_size: int = 2048, seed: int | None = None
) -> Tensor:
    """One draw :math:`z_n \\sim q(z \\mid x_n)` per image (``sample=True``, the paper's protocol) or the mean."""
    device = next(module.parameters()).device
    out = []
    gen_state = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with gen_state, eval_mode(module):
        if seed is not None:
            torch.manual_seed(seed)
        for chunk in _chunks(x, batch_size):
            q = module.posterior(chunk.to(device))
            out.append(q.sample() if sample else q.mean)
    return torch.cat(out)


@torch.no_grad()
def cluster_probabilities(
    module: torch.nn.Module,
    x: Tensor,
    *,
    sample: bool = True,
    batch_size: int = 2048,
    seed: int | None = None,
) -> np.ndarray:
    """Responsibilities :math:`q(c = k \\mid z_n)` (N, K) at ``z`` from :func:`latent_representation`."""
    z = latent_representation(module, x, sample=sample, batch_size=batch_size, seed=seed)
    with eval_mode(module):
        probs = [module.prior.cluster_probs(chunk, module.pseudo_encoder) for chunk in _chunks(z, batch_size)]
    return torch.cat(probs).cpu().numpy()


def evaluate_clustering(
    module: torch.nn.Module,
    x: Tensor,
    labels: Tensor | np.ndarray,
    *,
    sample: bool = True,
    batch_size: int = 2048,
    seed: int | None = 0,
) -> ClusteringScores:
    """:func:`pyro_vmm.metrics.clustering_scores` of the model's responsibilities on ``(x, labels)``."""
    probs = cluster_probabilities(module, x, sample=sample, batch_size=batch_size, seed=seed)
    return clustering_scores(probs, np.asarray(labels))
