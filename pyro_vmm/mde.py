"""MDE (minimum-distortion embedding, Agrawal et al. 2021) of a latent, for the figures of :mod:`pyro_vmm.plotting`.

pymde's ``preserve_neighbors`` with the settings of the former ``scvi.model.utils.mde`` (removed from scvi-tools 1.4):
2-D, ``Standardized`` constraint, 15 neighbours, repulsive fraction 0.7; ``pymde.seed(seed)`` makes it repeatable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

__all__ = ["mde_embedding"]


@contextlib.contextmanager
def _seeded_eigsh(seed: int) -> Iterator[None]:
    """pymde's spectral initialisation calls ``scipy.sparse.linalg.eigsh`` without a start vector, so ARPACK's
    process-global random state makes repeated calls differ; give it a seeded ``v0`` for the duration."""
    import scipy.sparse.linalg as spla

    original = spla.eigsh

    def eigsh(A, *args, **kwargs):
        kwargs.setdefault("v0", np.random.default_rng(seed).uniform(-1.0, 1.0, A.shape[0]))
        return original(A, *args, **kwargs)

    spla.eigsh = eigsh
    try:
        yield
    finally:
        spla.eigsh = original


def mde_embedding(latent, seed: int = 0, device: str = "cpu", n_neighbors: int = 15) -> np.ndarray:
    """2-D MDE of ``latent`` (N, D) preserving its ``n_neighbors``-NN graph; (N, 2) float32, repeatable per seed."""
    import torch

    from pyro_vmm._compat import import_pymde

    x = np.asarray(latent, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"MDE needs a (cells x dims) latent with at least 3 cells, got shape {x.shape}")
    pymde = import_pymde()
    from threadpoolctl import threadpool_limits

    # the L-BFGS fit amplifies last-bit differences, so multi-threaded BLAS/torch reductions would make the picture
    # differ between runs: one thread for the (seconds-long) fit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1), _seeded_eigsh(seed):
            pymde.seed(seed)
            mde = pymde.preserve_neighbors(
                torch.from_numpy(x),
                embedding_dim=2,
                constraint=pymde.Standardized(),
                repulsive_fraction=0.7,
                n_neighbors=min(n_neighbors, x.shape[0] - 1),
                device=device,
                verbose=False,
            )
            emb = mde.embed(verbose=False)
    finally:
        torch.set_num_threads(threads)
    return emb.detach().cpu().numpy().astype(np.float32)
