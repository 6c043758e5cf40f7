"""The paper's classifier (§5.2): a one-vs-rest linear SVM with the squared hinge loss and C = 100, solved in
torch (truncated Newton) or by scikit-learn's liblinear."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.svm import LinearSVC
from torch import Tensor

from fvkernels.common.checks import check_finite
from fvkernels.evaluation.features import ArrayLike, NotFitted, as_matrix, check_fit_finite, class_indices

# What to do when the solver overflows on finite features: its GEMMs run in float32.
RESCALE_ADVICE = "rescale the features, e.g. with fvkernels.evaluation.normalize (signed square root and L2)"


class LinearSVM(ClassifierMixin, BaseEstimator):
    """One-vs-rest linear SVM with the squared hinge loss and C = 100, as in the paper; a scikit-learn classifier
    (get_params, clone, Pipeline, GridSearchCV, score).

    It minimises, for each class k, ½‖w_k‖² + C Σ_i max(0, 1 − y_ik (w_k·x_i + b_k))² with the intercept
    regularised like a feature of value 1 — the objective of scikit-learn's LinearSVC (liblinear), so
    both solvers reach the same optimum:
    - solver="newton" (default): a truncated Newton (CG) method in torch, all classes at once as GEMMs,
      on the features' device (GPU when they are there), float32 with float64 reductions;
    - solver="liblinear": scikit-learn's LinearSVC (single-threaded; slow to converge at C = 100).
    fit(features (N, D), labels (N,)) → self; decision_function(features) → (N, K) float32 scores, one
    column per class in `classes_` order (also for two classes); predict(features) → labels. Features may be
    torch tensors (any device; results are tensors) or numpy arrays (results are numpy arrays). After fit:
    classes_, n_features_in_, and weights_ (newton, (D + 1, K)) or liblinear_ (the fitted LinearSVC).

    Features holding NaN or ±Inf are refused (ValueError naming the rows), as are NaN or fractional labels; scores
    or weights that overflow on finite features raise instead of being returned.
    """

    def __init__(self, C: float = 100.0, solver: str = "newton", tol: float = 1e-5, max_iter: int = 100,
                 random_state: int = 0):
        self.C, self.solver, self.tol, self.max_iter, self.random_state = C, solver, tol, max_iter, random_state

    def fit(self, features: ArrayLike, labels: ArrayLike) -> "LinearSVM":
        if self.solver not in ("newton", "liblinear"):
            raise ValueError(f"solver must be 'newton' or 'liblinear', got {self.solver!r}")
        if not self.C > 0:
            raise ValueError(f"C must be positive, got {self.C}")
        x = as_matrix(features, "features").detach()
        self.classes_, indices = class_indices(labels, x.shape[0])
        if len(self.classes_) < 2:
            raise ValueError(f"the SVM needs at least two classes in labels, got only {self.classes_.tolist()}")
        self.n_features_in_ = x.shape[1]
        y = torch.from_numpy(indices.astype(np.int64)).to(x.device)
        if self.solver == "liblinear":
            self.liblinear_ = LinearSVC(C=self.C, tol=self.tol, max_iter=max(self.max_iter, 1000),
                                        random_state=self.random_state).fit(x.cpu().numpy(), y.cpu().numpy())
        else:
            targets = torch.where(y[:, None] == torch.arange(len(self.classes_), device=x.device)[None, :], 1.0, -1.0)
            self.weights_ = squared_hinge_newton(_solver_input(x), targets, self.C, self.tol, self.max_iter)
        check_fit_finite(self, RESCALE_ADVICE)
        return self

    def decision_function(self, features: ArrayLike):
        x = self._checked_features(features)
        if self.solver == "liblinear":
            scores = torch.from_numpy(self.liblinear_.decision_function(x.cpu().numpy())).float()
            if scores.dim() == 1:  # scikit-learn gives one column, positive for classes_[1], for two classes
                scores = torch.stack([-scores, scores], 1)
        else:
            scores = (_solver_input(x.to(self.weights_.device)) @ self.weights_).cpu()
        check_finite(scores, lambda rows: f"the scores of rows {rows} (indices) overflowed float32 although their "
                                          f"features are finite; {RESCALE_ADVICE}")
        return scores.numpy() if isinstance(features, np.ndarray) else scores

    def predict(self, features: ArrayLike):
        """The predicted labels: a numpy array of classes_' type for numpy features (any labels); a tensor for
        tensor features with numeric labels."""
        scores = torch.as_tensor(self.decision_function(features))
        predicted = self.classes_[scores.argmax(1).numpy()]
        if isinstance(features, np.ndarray) or self.classes_.dtype.kind not in "biuf":
            return predicted
        return torch.from_numpy(predicted)

    def _checked_features(self, features: ArrayLike) -> Tensor:
        if not hasattr(self, "classes_"):
            raise NotFitted("LinearSVM is not fitted yet; call fit(features, labels) first")
        x = as_matrix(features, "features").detach()
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {x.shape[1]} features but LinearSVM was fitted with {self.n_features_in_} "
                             "features; encode them with the encoder the SVM was trained on")
        return x


def _solver_input(features: Tensor) -> Tensor:
    """The newton solver's float32 features with the intercept's column of ones. Finite features beyond float32's
    range become ±Inf there, and the solver would stop at zero weights without a word: refused instead."""
    x = features.float()
    largest = torch.finfo(torch.float32).max
    check_finite(x, lambda rows: f"features rows {rows} (indices) exceed float32's range (±{largest:.3g}), in which "
                                 f"the solver computes; {RESCALE_ADVICE}")
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
