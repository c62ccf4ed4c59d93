"""pyro_vmm.metrics on small cases computed by hand (numbers derived in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pyro_vmm.metrics import (
    cluster_batch_mixing,
    clustering_scores,
    hungarian_accuracy,
    most_probable_member_accuracy,
    most_probable_member_labels,
    nmi_merged,
    nmi_unmerged,
    utilized_clusters,
)

# Case A: 6 images, labels 0,0,1,1,2,2; argmax clusters 0,0,1,1,0,2.
# Most probable members: cluster 0 -> image 0 (0.9, label 0), cluster 1 -> image 3 (0.8, label 1),
# cluster 2 -> image 5 (0.7, label 2), so predictions 0,0,1,1,0,2 and accuracy 5/6.
LABELS_A = np.array([0, 0, 1, 1, 2, 2])
PROBS_A = np.array(
    [
        [0.9, 0.05, 0.05],
        [0.6, 0.3, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.8, 0.1],
        [0.5, 0.1, 0.4],
        [0.1, 0.2, 0.7],
    ]
)
# NMI by hand: contingency (cluster x label) = [[2,0,1],[0,2,0],[0,0,1]], N = 6.
# H(Y) = ln 3; H(C) = -(1/2 ln 1/2 + 1/3 ln 1/3 + 1/6 ln 1/6);
# I = 1/3 ln 2 + 0 + 1/3 ln 3 + 1/6 ln 3; NMI = I / ((H(Y) + H(C)) / 2)  (arithmetic mean, sklearn's default).
H_Y_A = math.log(3)
H_C_A = -(0.5 * math.log(0.5) + math.log(1 / 3) / 3 + math.log(1 / 6) / 6)
MI_A = math.log(2) / 3 + math.log(3) / 3 + math.log(3) / 6
NMI_A = MI_A / ((H_Y_A + H_C_A) / 2)  # = 0.7397
# ARI by hand: sum C(n_ij, 2) = 2; rows sum C(a_i, 2) = 3 + 1 + 0 = 4; columns 1 + 1 + 1 = 3; C(6, 2) = 15.
ARI_A = (2 - 4 * 3 / 15) / ((4 + 3) / 2 - 4 * 3 / 15)  # = 0.4444

# Case B: labels 0,0,0,1,1,1; argmax clusters 0,0,1,2,2,2 (cluster 3 unused).  Clusters 0 and 1 both map to
# label 0, so the merged prediction is perfect while the unmerged NMI pays for the split.
LABELS_B = np.array([0, 0, 0, 1, 1, 1])
PROBS_B = np.array(
    [
        [0.7, 0.1, 0.1, 0.1],
        [0.8, 0.1, 0.05, 0.05],
        [0.1, 0.6, 0.1, 0.2],
        [0.1, 0.1, 0.7, 0.1],
        [0.05, 0.05, 0.6, 0.3],
        [0.1, 0.1, 0.5, 0.3],
    ]
)
# unmerged: every cluster is pure, so I = H(Y) = ln 2; H(C) with sizes 2, 1, 3.
H_C_B = -(math.log(1 / 3) / 3 + math.log(1 / 6) / 6 + 0.5 * math.log(0.5))
NMI_B_UNMERGED = math.log(2) / ((math.log(2) + H_C_B) / 2)  # = 0.8133
# Hungarian (one-to-one): counts [[2,0],[1,0],[0,3]] -> cluster 2 -> label 1 (3), cluster 0 -> label 0 (2): 5/6.


def test_utilized_clusters_counts_distinct_argmax():
    assert utilized_clusters(PROBS_A.argmax(1)) == 3
    assert utilized_clusters(PROBS_B.argmax(1)) == 3  # cluster 3 is never an argmax
    assert utilized_clusters([4, 4, 4]) == 1


def test_most_probable_member_protocol_case_a():
    np.testing.assert_array_equal(most_probable_member_labels(PROBS_A, LABELS_A), [0, 0, 1, 1, 0, 2])
    assert most_probable_member_accuracy(PROBS_A, LABELS_A) == pytest.approx(5 / 6)


def test_most_probable_member_is_not_majority_vote():
    """One cluster holding labels 1, 1, 0: its most probable member (0.9) has label 0, so everything is called 0."""
    labels = np.array([1, 1, 0])
    probs = np.array([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
    np.testing.assert_array_equal(most_probable_member_labels(probs, labels), [0, 0, 0])
    assert most_probable_member_accuracy(probs, labels) == pytest.approx(1 / 3)  # a majority vote would give 2/3
    assert nmi_unmerged(probs.argmax(1), labels) == pytest.approx(0.0)


def test_nmi_merged_and_unmerged_by_hand():
    assert nmi_unmerged(PROBS_A.argmax(1), LABELS_A) == pytest.approx(NMI_A, abs=1e-12)
    assert nmi_merged(PROBS_A, LABELS_A) == pytest.approx(NMI_A, abs=1e-12)  # mapping is one-to-one here
    assert nmi_unmerged(PROBS_B.argmax(1), LABELS_B) == pytest.approx(NMI_B_UNMERGED, abs=1e-12)
    assert nmi_merged(PROBS_B, LABELS_B) == pytest.approx(1.0)


def test_hungarian_accuracy_by_hand():
    assert hungarian_accuracy(PROBS_A.argmax(1), LABELS_A) == pytest.approx(5 / 6)
    assert hungarian_accuracy(PROBS_B.argmax(1), LABELS_B) == pytest.approx(5 / 6)
    # label names need not be 0..C-1 and cluster ids need not match them
    assert hungarian_accuracy([7, 7, 3, 3], ["b", "b", "a", "a"]) == pytest.approx(1.0)


def test_clustering_scores_orchestrator():
    a = clustering_scores(PROBS_A, LABELS_A)
    assert a.utilized_clusters == 3
    assert a.accuracy == pytest.approx(5 / 6)
    assert a.nmi_unmerged == pytest.approx(NMI_A, abs=1e-12)
    assert a.ari_unmerged == pytest.approx(ARI_A, abs=1e-12)
    assert a.ari_merged == pytest.approx(ARI_A, abs=1e-12)
    assert a.hungarian_accuracy == pytest.approx(5 / 6)  # 3 utilized clusters == 3 classes
    b = clustering_scores(PROBS_B, LABELS_B)
    assert (b.utilized_clusters, b.accuracy, b.nmi_merged, b.ari_merged) == (3, 1.0, pytest.approx(1.0), 1.0)
    assert b.hungarian_accuracy is None  # 3 clusters for 2 classes: not one-to-one
    assert set(b.to_dict()) >= {"utilized_clusters", "accuracy", "nmi_merged", "nmi_unmerged"}


def test_cluster_batch_mixing_by_hand():
    s = np.array(["a", "a", "b", "b"])
    assert cluster_batch_mixing([0, 0, 1, 1], s) == pytest.approx(0.0, abs=1e-12)  # clusters split by batch
    assert cluster_batch_mixing([0, 1, 0, 1], s) == pytest.approx(1.0)  # each cluster is half a, half b
    assert cluster_batch_mixing([5, 5, 5, 5], s) == pytest.approx(1.0)  # one cluster: as mixed as the data
    # clusters {a, a, b} and {b}: H(s|c) = 3/4 (ln 3 - 2/3 ln 2), H(s) = ln 2
    assert cluster_batch_mixing([0, 0, 0, 1], s) == pytest.approx(0.75 * math.log2(3) - 0.5, abs=1e-12)
    # unbalanced batches a, a, a, b; clusters {a, a} and {a, b}: H(s|c) = 1/2 ln 2, H(s) = ln 4 - 3/4 ln 3
    expected = 0.5 * math.log(2) / (math.log(4) - 0.75 * math.log(3))
    assert cluster_batch_mixing([0, 0, 1, 1], ["a", "a", "a", "b"]) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="two batches"):
        cluster_batch_mixing([0, 1], ["a", "a"])
    with pytest.raises(ValueError, match="same length"):
        cluster_batch_mixing([0, 1, 2], ["a", "b"])


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="cluster_probs"):
        most_probable_member_labels(PROBS_A[:4], LABELS_A)
    with pytest.raises(ValueError, match="1-D"):
        utilized_clusters(np.zeros((2, 2)))
