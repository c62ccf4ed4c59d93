"""scvi-tools models of Pyro programs with a VMM prior (laid out like ``scvi.external.decipher``).

==========================  ============================================================================
``_base.py``                :class:`PyroVMMModel`, the generic model class (train, save/load, latents, ...)
``_model.py``               :class:`VMMSCVI`, scVI's AnnData fields and module on the base
``_totalvi.py``             :class:`VMMTOTALVI`, totalVI's AnnData fields (RNA + proteins) and module
``_ldvae.py``               :class:`VMMLDVAE`, the LDVAE of ``models/ldvae.py`` on the base (notebook 03's recipe)
``_latent.py``              latents, cluster probabilities / assignments, ELBO, marginal likelihood, PPC
``_trainingplan.py``        :class:`VMMTrainingPlan`, the Lightning plan of the alternating VI / EM step
``_data.py``, ``_backed.py``  :class:`InMemoryDataSplitter`, datasets, sampler; rows of a backed AnnData
``_checkpoint.py``          atomic, safely loaded checkpoint files and RNG states
``_resume.py``              checkpoints of ``train()`` and exact resume
``_expression.py``          decoded expression, differential expression, cluster markers
``_query.py``               reference mapping of new batches (scArches)
``_from_scvi.py``           :meth:`VMMSCVI.from_scvi_model`
==========================  ============================================================================

Names are imported on first access, so ``import pyro_vmm.scvi._checkpoint`` does not import scvi-tools.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "InMemoryDataSplitter", "MinibatchSampler", "PyroVMMModel", "VMMLDVAE", "VMMSCVI", "VMMTOTALVI", "VMMTrainingPlan",
]

_LAZY = {
    "InMemoryDataSplitter": "._data",
    "MinibatchSampler": "._data",
    "PyroVMMModel": "._base",
    "VMMLDVAE": "._ldvae",
    "VMMSCVI": "._model",
    "VMMTOTALVI": "._totalvi",
    "VMMTrainingPlan": "._trainingplan",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'pyro_vmm.scvi' has no attribute {name!r}")
