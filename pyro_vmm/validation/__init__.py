"""Input checks that fail early with one clear message: what is wrong, where it is, and how to fix it.

Every check raises :class:`InputError` (a ``ValueError``, so the command line turns it into one error line and exit
code 2).  Count matrices are scanned without densifying: for scipy sparse matrices only the stored values
(``.data``) are inspected, and backed AnnData files are read in row (CSR, dense) or column (CSC) chunks.

Typical use, from a model's ``setup_anndata``::

    from pyro_vmm.validation import validate_anndata, validate_positive_int
    validate_anndata(adata, layer="counts", batch_key="batch", labels_key="cell_type")
    n_components = validate_positive_int("n_components", n_components)

Modules: :mod:`~pyro_vmm.validation.counts` (one scan of a count matrix), :mod:`~pyro_vmm.validation.keys` (``obs``
keys, covariates, positive numbers, gene lists), :mod:`~pyro_vmm.validation.anndata` (a whole AnnData, reference or
query); the errors and message helpers in ``_messages``.
"""

from __future__ import annotations

from ._messages import InputError, InputWarning
from .anndata import validate_anndata, validate_query
from .counts import CountsSummary, validate_counts
from .keys import (
    validate_covariates,
    validate_genes_match,
    validate_obs_key,
    validate_positive_float,
    validate_positive_int,
)

__all__ = [
    "CountsSummary",
    "InputError",
    "InputWarning",
    "validate_obs_key",
    "validate_anndata",
    "validate_covariates",
    "validate_counts",
    "validate_genes_match",
    "validate_positive_float",
    "validate_positive_int",
    "validate_query",
]
