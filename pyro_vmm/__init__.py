"""pyro-vmm: the VampPrior Mixture Model in Pyro, for image clustering and single-cell integration + clustering.

Light imports only: ``import pyro_vmm`` does not import scvi-tools, scanpy or scib-metrics.  The scvi-tools models
``pyro_vmm.VMMSCVI``, ``pyro_vmm.VMMTOTALVI`` and ``pyro_vmm.VMMLDVAE`` are loaded on first access.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .infer import AlternatingSVI, sample_latent
from .priors import PRIORS, LatentPrior, build_prior
from .utils import set_seed

__version__ = "0.1.0"
__all__ = [
    "PRIORS", "AlternatingSVI", "LatentPrior", "PyroVMMModel", "VMMLDVAE", "VMMSCVI", "VMMTOTALVI", "build_prior",
    "sample_latent", "set_seed",
]

_LAZY = {"PyroVMMModel": "pyro_vmm.scvi", "VMMLDVAE": "pyro_vmm.scvi", "VMMSCVI": "pyro_vmm.scvi", "VMMTOTALVI": "pyro_vmm.scvi"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pyro_vmm' has no attribute {name!r}")
