"""Clustering metrics of the VMM paper (one function per metric) and an orchestrator.

Protocol (paper and reference code): every cluster ``k`` is labelled with the true label of its *most probable
member*, ``argmax_n q(c = k | z_n)``; each datum is predicted as the label of its argmax cluster.  Many clusters may
share a label.  "Merged" metrics compare true labels with these mapped labels, "unmerged" ones with raw cluster ids.
Hungarian (one-to-one) accuracy is reported only when the number of utilized clusters equals the number of classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, mutual_info_score, normalized_mutual_info_score

__all__ = [
    "ClusteringScores",
    "cluster_batch_mixing",
    "clustering_scores",
    "hungarian_accuracy",
    "most_probable_member_accuracy",
    "most_probable_member_labels",
    "nmi_merged",
    "nmi_unmerged",
    "utilized_clusters",
]


def _as_labels(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    return y


def utilized_clusters(assignments) -> int:
    """Number of distinct argmax clusters."""
    return int(np.unique(_as_labels(assignments)).size)


def most_probable_member_labels(cluster_probs: np.ndarray, labels) -> np.ndarray:
    """Predicted label per datum: the label of the most probable member of its argmax cluster.  Shape (N,)."""
    probs = np.asarray(cluster_probs)
    labels = _as_labels(labels)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"cluster_probs must be (N, K) with N = {labels.shape[0]}, got {probs.shape}")
    cluster_label = labels[probs.argmax(axis=0)]  # (K,): label of argmax_n q(c=k|z_n)
    return cluster_label[probs.argmax(axis=1)]


def most_probable_member_accuracy(cluster_probs: np.ndarray, labels) -> float:
    """Accuracy of :func:`most_probable_member_labels` (the paper's clustering accuracy)."""
    return float(np.mean(most_probable_member_labels(cluster_probs, labels) == _as_labels(labels)))


def nmi_unmerged(assignments, labels) -> float:
    """NMI between true labels and raw cluster ids (arithmetic averaging)."""
    return float(normalized_mutual_info_score(_as_labels(labels), _as_labels(assignments)))


def nmi_merged(cluster_probs: np.ndarray, labels) -> float:
    """NMI between true labels and most-probable-member mapped labels."""
    return float(normalized_mutual_info_score(_as_labels(labels), most_probable_member_labels(cluster_probs, labels)))


def hungarian_accuracy(assignments, labels) -> float:
    """One-to-one (Hungarian) accuracy; clusters beyond the matching count as errors."""
    a, y = _as_labels(assignments), _as_labels(labels)
    ca, ia = np.unique(a, return_inverse=True)
    cy, iy = np.unique(y, return_inverse=True)
    counts = np.zeros((ca.size, cy.size), dtype=np.int64)
    np.add.at(counts, (ia, iy), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / y.size)


def cluster_batch_mixing(assignments, batch) -> float:
    r"""How mixed the clusters are across batches: :math:`H(s \mid c) / H(s) = 1 - I(c; s) / H(s)`.

    :math:`s` is the batch and :math:`c` the cluster of a cell (natural logs).  1: every cluster has the batch
    composition of the whole data set; 0: every cluster holds cells of one batch only (clusters split by batch).
    Raises for fewer than two batches, where mixing is undefined."""
    c, s = _as_labels(assignments), _as_labels(batch)
    if c.shape != s.shape:
        raise ValueError(f"assignments and batch must have the same length, got {c.shape} and {s.shape}")
    if np.unique(s).size < 2:
        raise ValueError("cluster_batch_mixing needs at least two batches")
    return float(1.0 - mutual_info_score(s, c) / mutual_info_score(s, s))  # I(s; s) = H(s)


@dataclass(frozen=True)
class ClusteringScores:
    utilized_clusters: int
    accuracy: float
    nmi_merged: float
    nmi_unmerged: float
    ari_merged: float
    ari_unmerged: float
    hungarian_accuracy: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def clustering_scores(cluster_probs: np.ndarray, labels) -> ClusteringScores:
    """All clustering metrics from responsibilities ``q(c | z)`` (N, K) and true labels (N,)."""
    probs = np.asarray(cluster_probs)
    y = _as_labels(labels)
    assign = probs.argmax(axis=1)
    mapped = most_probable_member_labels(probs, y)
    n_used = utilized_clusters(assign)
    return ClusteringScores(
        utilized_clusters=n_used,
        accuracy=float(np.mean(mapped == y)),
        nmi_merged=float(normalized_mutual_info_score(y, mapped)),
        nmi_unmerged=nmi_unmerged(assign, y),
        ari_merged=float(adjusted_rand_score(y, mapped)),
        ari_unmerged=float(adjusted_rand_score(y, assign)),
        hungarian_accuracy=hungarian_accuracy(assign, y) if n_used == np.unique(y).size else None,
    )
