"""Classification protocol of the paper (§5.2): signed square root and L2 normalisation of the set
representations, a one-vs-rest linear SVM with C = 100, and the metrics the results are reported in.

Scores are (N, K) tensors, one column per class, and labels are class indices 0…K−1 into those columns
(train the SVM on labels 0…K−1 so that its score columns are the classes in order).
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch import Tensor

NORM_FLOOR = 1e-12
ArrayLike = Union[Tensor, np.ndarray]


def normalize(features: ArrayLike) -> ArrayLike:
    """Row-wise sign(x)·sqrt(|x|), then division by the row's L2 norm (floored at 1e-12, so a zero row
    stays zero). Returns the input's type: torch in, torch out; numpy in, numpy out."""
    as_numpy = isinstance(features, np.ndarray)
    rows = _as_matrix(features, "features")
    rooted = rows.sign() * rows.abs().sqrt()
    out = rooted / torch.linalg.vector_norm(rooted, dim=1, keepdim=True).clamp_min(NORM_FLOOR)
    return out.numpy() if as_numpy else out


def _as_matrix(values: ArrayLike, name: str) -> Tensor:
    tensor = torch.as_tensor(values)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a (N, D) matrix, got shape {tuple(tensor.shape)}")
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating, got {tensor.dtype}")
    return tensor


def _as_labels(labels: ArrayLike, count: int, num_classes: int = None) -> Tensor:
    tensor = torch.as_tensor(labels)
    if tensor.dim() != 1 or tensor.shape[0] != count:
        raise ValueError(f"labels must be a vector of {count} class indices (one per row), "
                         f"got shape {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {tensor.dtype}")
    if num_classes is not None and count and (int(tensor.min()) < 0 or int(tensor.max()) >= num_classes):
        raise ValueError(f"labels must index the {num_classes} score columns (0…{num_classes - 1}), got values "
                         f"in [{int(tensor.min())}, {int(tensor.max())}]")
    return tensor.long()


def _scores_and_labels(scores: ArrayLike, labels: ArrayLike):
    scores = _as_matrix(scores, "scores")
    return scores, _as_labels(labels, scores.shape[0], scores.shape[1]).to(scores.device)


# ---- classifier ------------------------------------------------------------------------------------------

class LinearSVM:
    """One-vs-rest linear SVM (scikit-learn's LinearSVC, squared hinge loss, C = 100 as in the paper).

    fit(features (N, D), labels (N,)) → self; decision_function(features) → (N, K) float32 scores, one
    column per class in `classes_` order (also for two classes); predict(features) → labels.
    Inputs may be torch tensors (any device) or numpy arrays.
    """

    def __init__(self, C: float = 100.0, max_iter: int = 10000, random_state: int = 0, **linear_svc_options):
        try:
            from sklearn.svm import LinearSVC
        except ImportError as error:
            raise ImportError("LinearSVM needs scikit-learn: pip install scikit-learn "
                              "(or pip install 'fvkernels[eval]')") from error
        self.model = LinearSVC(C=C, max_iter=max_iter, random_state=random_state, **linear_svc_options)

    @staticmethod
    def _numpy(features: ArrayLike) -> np.ndarray:
        return _as_matrix(features, "features").detach().cpu().numpy()

    def fit(self, features: ArrayLike, labels: ArrayLike) -> "LinearSVM":
        x = self._numpy(features)
        y = _as_labels(labels, x.shape[0]).cpu().numpy()
        if np.unique(y).size < 2:
            raise ValueError("the SVM needs at least two classes in labels")
        self.model.fit(x, y)
        return self

    @property
    def classes_(self) -> np.ndarray:
        return self.model.classes_

    def decision_function(self, features: ArrayLike) -> Tensor:
        scores = torch.from_numpy(self.model.decision_function(self._numpy(features))).float()
        if scores.dim() == 1:  # scikit-learn gives one column, positive for classes_[1], for two classes
            scores = torch.stack([-scores, scores], 1)
        return scores

    def predict(self, features: ArrayLike) -> Tensor:
        return torch.from_numpy(self.classes_)[self.decision_function(features).argmax(1)]


def train_svm(features: ArrayLike, labels: ArrayLike, C: float = 100.0, **options) -> LinearSVM:
    """A `LinearSVM` fitted on (features, labels)."""
    return LinearSVM(C=C, **options).fit(features, labels)


# ---- metrics ---------------------------------------------------------------------------------------------

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
