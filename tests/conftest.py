"""Shared fixtures: a tiny Pyro VAE that exercises every prior, and the path to the shared data sets."""

from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per xdist worker, for every library and every process a test starts (notebook kernels, the CLI,
    # DDP ranks): OpenMP/BLAS/XLA threads oversubscribing 2 cores make every op crawl
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_vmm.priors import build_prior
from pyro_vmm.utils import eval_mode

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


class ToyVAE(nn.Module):
    """x ~ N(W z + b, I), z ~ prior; q(z|x) diagonal Gaussian from a small MLP with BatchNorm."""

    def __init__(self, x_dim: int = 6, n_latent: int = 2, prior: str = "vmm", n_components: int = 5) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(x_dim, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2 * n_latent))
        self.decoder = nn.Linear(n_latent, x_dim)
        self.prior = build_prior(prior, n_latent, n_components, pseudo_inputs=torch.randn(n_components, x_dim))

    def _q(self, x: torch.Tensor) -> dist.Distribution:
        loc, raw = self.encoder(x).chunk(2, -1)
        return dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1)

    def pseudo_posterior(self, u: torch.Tensor) -> dist.Distribution:
        with eval_mode(self.encoder):
            return self._q(u)

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=1.0 / x.shape[0]):
            z = pyro.sample("z", self.prior.latent_dist(self.pseudo_posterior))
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=1.0 / x.shape[0]):
            pyro.sample("z", self._q(x))


@pytest.fixture
def toy_vae():
    return ToyVAE
