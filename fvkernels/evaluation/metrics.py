"""The metrics the paper reports: accuracy, top-k accuracy and mean average precision of (N, K) class scores.

Scores are (N, K) tensors, one column per class, and labels are class indices 0…K−1 into those columns
(train the SVM on labels 0…K−1 so that its score columns are the classes in order).
"""
from __future__ import annotations

import torch

from fvkernels.evaluation.features import ArrayLike, as_labels, as_matrix


def _scores_and_labels(scores: ArrayLike, labels: ArrayLike):
    scores = as_matrix(scores, "scores")
    return scores, as_labels(labels, scores.shape[0], scores.shape[1]).to(scores.device)


def accuracy(scores: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of rows whose highest-scoring column is the label."""
    return top_k_accuracy(scores, labels, 1)


def top_k_accuracy(scores: ArrayLike, labels: ArrayLike, k: int) -> float:
    """Fraction of rows whose label is among the k highest-scoring columns."""
    scores, labels = _scores_and_labels(scores, labels)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must lie in 1…{scores.shape[1]} (the number of classes), got {k}")
    if scores.shape[0] == 0:
        raise ValueError("accuracy of zero samples is undefined")
    top = scores.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(1).double().mean())


def mean_average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Mean over classes of the one-vs-rest average precision of each score column, computed as
    scikit-learn's average_precision_score (Σ (R_n − R_{n−1}) P_n over distinct score thresholds, tied
    scores counted together). Classes without a positive sample have no AP and are left out."""
    scores, labels = _scores_and_labels(scores, labels)
    num_samples, num_classes = scores.shape
    positives = labels[:, None] == torch.arange(num_classes, device=scores.device)
    present = positives.any(0)
    if not bool(present.any()):
        raise ValueError("no class has a positive sample; mean average precision is undefined")
    sorted_scores, order = scores.double().sort(0, descending=True)
    hits = positives.gather(0, order).double()
    true_positives = hits.cumsum(0)
    # Only the last row of a run of tied scores is a threshold: ties enter precision and recall together.
    threshold = torch.ones_like(hits, dtype=torch.bool)
    threshold[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    precision = true_positives / torch.arange(1, num_samples + 1, device=scores.device, dtype=torch.float64)[:, None]
    recall = true_positives / hits.sum(0).clamp_min(1)
    recall_at_thresholds = torch.where(threshold, recall, torch.zeros_like(recall))
    previous_recall = torch.cat([torch.zeros_like(recall[:1]), recall_at_thresholds.cummax(0).values[:-1]])
    average_precision = ((recall - previous_recall) * precision * threshold).sum(0)
    return float(average_precision[present].mean())
