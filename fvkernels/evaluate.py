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

from fvkernels.encode import improved_normalisation

ArrayLike = Union[Tensor, np.ndarray]


def normalize(features: ArrayLike) -> ArrayLike:
    """Row-wise sign(x)·sqrt(|x|), then division by the row's L2 norm (floored at 1e-12, so a zero row
    stays zero): fvkernels.encode.improved_normalisation. Returns the input's type: torch in, torch out;
    numpy in, numpy out."""
    out = improved_normalisation(_as_matrix(features, "features"))
    return out.numpy() if isinstance(features, np.ndarray) else out


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
    """One-vs-rest linear SVM with the squared hinge loss and C = 100, as in the paper.

    It minimises, for each class k, ½‖w_k‖² + C Σ_i max(0, 1 − y_ik (w_k·x_i + b_k))² with the intercept
    regularised like a feature of value 1 — the objective of scikit-learn's LinearSVC (liblinear), so
    both solvers reach the same optimum:
    - solver="newton" (default): a truncated Newton (CG) method in torch, all classes at once as GEMMs,
      on the features' device (GPU when they are there), float32 with float64 reductions;
    - solver="liblinear": scikit-learn's LinearSVC (single-threaded; slow to converge at C = 100).
    fit(features (N, D), labels (N,)) → self; decision_function(features) → (N, K) float32 scores, one
    column per class in `classes_` order (also for two classes); predict(features) → labels.
    Inputs may be torch tensors (any device) or numpy arrays.
    """

    def __init__(self, C: float = 100.0, solver: str = "newton", tol: float = 1e-5, max_iter: int = 100,
                 random_state: int = 0, **linear_svc_options):
        if solver not in ("newton", "liblinear"):
            raise ValueError(f"solver must be 'newton' or 'liblinear', got {solver!r}")
        if not C > 0:
            raise ValueError(f"C must be positive, got {C}")
        self.C, self.solver, self.tol, self.max_iter = C, solver, tol, max_iter
        self.model = None
        if solver == "liblinear":
            try:
                from sklearn.svm import LinearSVC
            except ImportError as error:
                raise ImportError("solver='liblinear' needs scikit-learn: pip install scikit-learn "
                                  "(or pip install 'fvkernels[demo]')") from error
            self.model = LinearSVC(C=C, tol=tol, max_iter=max(max_iter, 1000), random_state=random_state,
                                   **linear_svc_options)
        self.weights_, self.classes_ = None, None

    @staticmethod
    def _numpy(features: ArrayLike) -> np.ndarray:
        return _as_matrix(features, "features").detach().cpu().numpy()

    def fit(self, features: ArrayLike, labels: ArrayLike) -> "LinearSVM":
        x = _as_matrix(features, "features").detach()
        y = _as_labels(labels, x.shape[0]).to(x.device)
        classes = torch.unique(y)
        if classes.numel() < 2:
            raise ValueError("the SVM needs at least two classes in labels")
        self.classes_ = classes.cpu().numpy()
        if self.model is not None:
            self.model.fit(self._numpy(x), y.cpu().numpy())
        else:
            targets = torch.where(y[:, None] == classes[None, :], 1.0, -1.0)
            self.weights_ = squared_hinge_newton(_with_intercept(x.float()), targets, self.C, self.tol, self.max_iter)
        return self

    def decision_function(self, features: ArrayLike) -> Tensor:
        if self.classes_ is None:
            raise RuntimeError("LinearSVM is not fitted yet; call fit(features, labels) first")
        if self.model is not None:
            scores = torch.from_numpy(self.model.decision_function(self._numpy(features))).float()
            if scores.dim() == 1:  # scikit-learn gives one column, positive for classes_[1], for two classes
                scores = torch.stack([-scores, scores], 1)
            return scores
        x = _as_matrix(features, "features").detach().float()
        return (_with_intercept(x.to(self.weights_.device)) @ self.weights_).cpu()

    def predict(self, features: ArrayLike) -> Tensor:
        return torch.from_numpy(self.classes_)[self.decision_function(features).argmax(1)]


def _with_intercept(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones_like(x[:, :1])], 1)


def squared_hinge_newton(x: Tensor, targets: Tensor, C: float, tol: float = 1e-5, max_iter: int = 100) -> Tensor:
    """argmin_W Σ_k ½‖w_k‖² + C Σ_i max(0, 1 − t_ik x_i·w_k)² for x (N, D), targets ±1 (N, K): (D, K).

    The primal trust-region-free variant of liblinear's TRON: Newton steps with the generalised
    Hessian I + 2C X_Aᵀ X_A (A = samples inside the margin), solved by conjugate gradients to a relative
    residual of 0.1, and a backtracking line search; all K problems advance together as GEMMs. Stops
    when every class's gradient norm is below tol × its initial norm.
    """
    num_classes = targets.shape[1]
    weights = x.new_zeros((x.shape[1], num_classes))

    def objective_and_gradient(w):
        margins = (1 - targets * (x @ w)).clamp_min(0)
        value = 0.5 * w.double().square().sum(0) + C * margins.double().square().sum(0)
        gradient = w - 2 * C * (x.t() @ (targets * margins))
        return value, gradient, margins > 0

    value, gradient, active = objective_and_gradient(weights)
    initial_norm = torch.linalg.vector_norm(gradient, dim=0)
    for _ in range(max_iter):
        norms = torch.linalg.vector_norm(gradient, dim=0)
        unfinished = norms > tol * initial_norm
        if not bool(unfinished.any()):
            break
        step = _conjugate_gradient(x, active.to(x.dtype), -gradient * unfinished, C, 0.1 * norms)
        slope = (gradient * step).sum(0).double()
        scale = torch.ones(num_classes, dtype=torch.float64, device=x.device)
        for _ in range(20):  # Armijo backtracking, per class
            trial = weights + step * scale.to(x.dtype)
            trial_value, trial_gradient, trial_active = objective_and_gradient(trial)
            accepted = trial_value <= value + 1e-2 * scale * slope
            if bool(accepted.all()):
                break
            scale = torch.where(accepted, scale, scale / 2)
        if not bool(accepted.any()):  # no class can improve in float32 any more: converged as far as it goes
            break
        # A class whose step was not accepted keeps its weights (and is retried from them next iteration).
        weights = torch.where(accepted, trial, weights)
        value = torch.where(accepted, trial_value, value)
        gradient = torch.where(accepted, trial_gradient, gradient)
        active = torch.where(accepted, trial_active, active)
    return weights


def _conjugate_gradient(x: Tensor, active: Tensor, rhs: Tensor, C: float, tolerance: Tensor, max_steps: int = 250):
    """Solves (I + 2C Xᵀ diag(active_k) X) s_k = rhs_k for every column k at once."""
    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    residual_sq = residual.square().sum(0)
    for _ in range(max_steps):
        if bool((residual_sq.sqrt() <= tolerance).all()):
            break
        product = direction + 2 * C * (x.t() @ (active * (x @ direction)))
        curvature = (direction * product).sum(0)
        alpha = torch.where(curvature > 0, residual_sq / curvature.clamp_min(1e-30), torch.zeros_like(curvature))
        solution += alpha * direction
        residual -= alpha * product
        new_residual_sq = residual.square().sum(0)
        direction = residual + (new_residual_sq / residual_sq.clamp_min(1e-30)) * direction
        residual_sq = new_residual_sq
    return solution


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
