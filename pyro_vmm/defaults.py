r"""The one default recipe of VMM-scVI, shared by ``VMMSCVI(...)``, ``VMMSCVI.train()`` and ``pyro-vmm scrna``.

Every setting is a constant or a function of the data's size alone (number of cells :math:`N`); nothing reads labels.

=========================  ===========================================================================================
setting                    default and reason
=========================  ===========================================================================================
``encode_covariates``      ``True``: the batch enters the encoder as well as the decoder (the reference code's
                           encoder; scvi-tools ``SCVI`` leaves it out).  Under the mixture prior a cell type whose
                           expression differs between batches, seen by an encoder blind to the batch, takes one
                           component per batch (kang: CD14 monocytes split 83 % control / 80 % stimulated), and the
                           KL term then holds the two apart.  With the batch in the encoder both can map to one
                           component, the decoder's batch input giving back the difference; the pseudo-inputs carry
                           a batch vector (uniform at the start).
``max_epochs``             scvi-tools' heuristic :math:`\min(400, \mathrm{round}(20000 \cdot 400 / N))`, the budget
                           of ``SCVI.train()`` (so the two cost the same number of steps).
``n_epochs_kl_warmup``     ``max_epochs``: the KL term is annealed linearly over the whole run, as ``SCVI``
                           does at its defaults (400 epochs of warm-up).
``early_stopping``         ``False``, as ``SCVI.train()``: with the warm-up running to the end, the validation ELBO
                           keeps changing by design.
``validations_per_run``    10: without early stopping the validation ELBO is computed every ``max_epochs // 10``
                           epochs (every epoch costs ~4 % of the training time; ``SCVI.train()`` never validates
                           then).
``batch_size``, ``lr``     128 and :math:`10^{-3}` (scvi-tools' defaults).
``prior_lr_ratio``         1: the EM step moves at the VI step's rate (the reference code's default).
``n_clusters``             :math:`K = 30`, an upper bound on the clusters (three times the cell types of a typical
                           data set; raise it for atlases).  Each step costs :math:`O(K)` in the EM step, the
                           pseudo-input encoder pass and the mixture's log-density: :math:`K = 100` made an epoch
                           ~25 % slower than SCVI's.  :math:`K` also sets the hyperpriors' scale
                           (:math:`\mathrm{Dir}(1/(K\alpha))`, :math:`E[\Lambda_k] = K^{2/D} I`).
``merge_at``               merge moves at :math:`\tfrac12` and :math:`\tfrac34` of ``max_epochs``: the components are
                           grouped by the final-cluster rule below, and each group's weight goes to one component
                           (:meth:`~pyro_vmm.priors.VampPriorMixture.merge_components`).  MAP-EM has no Occam factor, so
                           it spends several components on one population (24 on cellbench_3cl's 3 cell lines), and a
                           population whose expression differs between batches takes one component per batch, which the
                           KL term then holds apart.  After the move the KL term pulls the group to one component, and
                           the last half of the run lets the encoder and the EM steps fit it.  Half-way the KL weight is
                           :math:`\beta = \tfrac12` and the latent has formed.
``min_cluster_size``       :math:`\max(10, \lceil N / 200 \rceil)`: a mixture component that is the most probable
                           one for fewer cells is not reported as a cluster; its cells go to their most probable
                           remaining component (:func:`final_components`).  10 cells is the least a cluster needs for
                           its marker genes (:meth:`VMMSCVI.cluster_markers`), and :math:`N/200` keeps the reported
                           clusters to at most 200 on large data.
clusters                   the kept components are then merged into clusters (:mod:`pyro_vmm.merging`), the pair of
                           least separated clusters first (Hennig's ridgeline ratio of their two-Gaussian density:
                           1 when it has one mode, whatever the clusters' sizes), and the partition of largest
                           integrated completed likelihood (ICL, BIC-penalised) along that path is kept: a split
                           stays only if it buys more than :math:`\tfrac p2 \log N` nats of fit (:math:`p` the
                           parameters of one full-covariance Gaussian), so the resolution grows with :math:`N`.
                           The same rule makes the merge moves.
=========================  ===========================================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULTS", "Recipe", "check_merge_at", "final_components", "merge_epochs", "min_cluster_size", "training_epochs",
]


@dataclass(frozen=True)
class Recipe:
    """The default settings (see the module docstring for the reason of each)."""

    n_clusters: int = 30
    n_latent: int = 10
    encode_covariates: bool = True
    batch_size: int = 128
    lr: float = 1e-3
    prior_lr_ratio: float = 1.0
    early_stopping: bool = False
    early_stopping_patience: int = 45
    #: without early stopping, log the validation ELBO this many times a run (every epoch costs ~4 % of the time)
    validations_per_run: int = 10
    #: scvi-tools' epoch heuristic: this many epochs up to ``heuristic_cells`` cells, proportionally fewer above
    max_epochs_cap: int = 400
    heuristic_cells: int = 20_000
    min_cluster_cells: int = 10
    min_cluster_fraction: float = 1 / 200
    #: merge moves at these fractions of ``max_epochs``
    merge_at: tuple[float, ...] = (0.5, 0.75)


DEFAULTS = Recipe()


def training_epochs(n_cells: int, recipe: Recipe = DEFAULTS) -> int:
    r""":math:`\min(E_{max}, \mathrm{round}(N_h E_{max} / N))`, at least 1 (scvi-tools' ``get_max_epochs_heuristic``)."""
    if n_cells < 1:
        raise ValueError(f"need at least one cell, got {n_cells}")
    epochs = round(recipe.heuristic_cells / n_cells * recipe.max_epochs_cap)
    return max(1, min(recipe.max_epochs_cap, int(epochs)))


def check_merge_at(merge_at, name: str = "merge_at") -> tuple[float, ...]:
    """``merge_at`` as a tuple of fractions of the run in (0, 1] (``None``: empty); a ``ValueError`` otherwise."""
    fractions = tuple(merge_at or ())
    bad = [f for f in fractions if isinstance(f, bool) or not 0 < float(f) <= 1]
    if bad:
        example = f"{name} 0.5 0.75" if name.startswith("--") else f"{name}=(0.5, 0.75)"
        raise ValueError(f"{name} takes fractions of the run in (0, 1], got {bad}; e.g. {example}")
    return tuple(float(f) for f in fractions)


def merge_epochs(max_epochs: int, merge_at=DEFAULTS.merge_at) -> list[int]:
    r"""The (1-based) epochs at whose end the merge moves run: :math:`\max(1, \mathrm{round}(f E))` for each fraction
    :math:`f \in (0, 1]` of ``merge_at`` (``None`` or empty: none)."""
    return sorted({max(1, round(f * max_epochs)) for f in check_merge_at(merge_at)})


def min_cluster_size(n_cells: int, recipe: Recipe = DEFAULTS) -> int:
    r""":math:`\max(10, \lceil N / 200 \rceil)` cells."""
    return max(recipe.min_cluster_cells, math.ceil(recipe.min_cluster_fraction * n_cells))


def assign_to(probs: np.ndarray, components: np.ndarray | None = None) -> np.ndarray:
    r""":math:`\arg\max_k q(c=k \mid z_n)` over ``components`` (all ``K`` when ``None``), as component indices."""
    probs = np.asarray(probs)
    if components is None:
        return probs.argmax(axis=1).astype(np.int64)
    components = np.asarray(components, dtype=np.int64)
    return components[probs[:, components].argmax(axis=1)]


def final_components(probs: np.ndarray, min_size: int) -> np.ndarray:
    r"""The mixture components reported as clusters, sorted: those that are :math:`\arg\max_k q(c=k \mid z_n)` for at
    least ``min_size`` of the cells in ``probs`` (N, K).

    Components are dropped smallest first, one at a time, and the cells of a dropped component move to their most
    probable remaining one before the next size check (so a component can grow above ``min_size`` by absorbing
    cells).  At least one component is kept."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"probs must be (cells, components), got shape {probs.shape}")
    kept = np.ones(probs.shape[1], dtype=bool)
    while True:
        assign = assign_to(probs, np.flatnonzero(kept))
        sizes = np.bincount(assign, minlength=probs.shape[1])
        sizes[~kept] = np.iinfo(sizes.dtype).max
        empty = np.flatnonzero(sizes == 0)
        if empty.size and empty.size < kept.sum():  # dropping components that own no cell moves no cell
            kept[empty] = False
            continue
        small = np.flatnonzero(sizes < min_size)
        if small.size == 0 or kept.sum() == 1:
            return np.flatnonzero(kept)
        kept[small[np.argmin(sizes[small])]] = False
