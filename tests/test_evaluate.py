"""Normalisation, the linear SVM, and the metrics, on hand-computed and synthetic data."""
import numpy as np
import pytest
import torch

from fvkernels.evaluation import LinearSVM, accuracy, mean_average_precision, normalize, top_k_accuracy, train_svm

# Four samples, three classes. Ranks of the true class: 1st, 2nd, 1st, 3rd.
SCORES = torch.tensor([[0.9, 0.1, 0.0],
                       [0.2, 0.5, 0.3],
                       [0.1, 0.2, 0.7],
                       [0.6, 0.3, 0.1]])
LABELS = torch.tensor([0, 2, 2, 2])


def test_normalize_signed_sqrt_then_l2():
    features = torch.tensor([[4.0, -9.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([[2 / 13 ** 0.5, -3 / 13 ** 0.5, 0.0], [0.0, 0.0, 0.0],
                             [-1 / 3 ** 0.5, 1 / 3 ** 0.5, 1 / 3 ** 0.5]], dtype=torch.float64)
    torch.testing.assert_close(normalize(features), expected, rtol=0, atol=1e-15)
    as_numpy = normalize(features.numpy())
    assert isinstance(as_numpy, np.ndarray)
    np.testing.assert_allclose(as_numpy, expected.numpy(), atol=1e-15)
    with pytest.raises(ValueError, match=r"\(N, D\) matrix"):
        normalize(torch.ones(3))


def test_accuracy_and_top_k_exact():
    assert accuracy(SCORES, LABELS) == 0.5
    assert top_k_accuracy(SCORES, LABELS, 1) == 0.5
    assert top_k_accuracy(SCORES, LABELS, 2) == 0.75
    assert top_k_accuracy(SCORES, LABELS, 3) == 1.0
    assert accuracy(SCORES.numpy(), LABELS.numpy()) == 0.5


def test_mean_average_precision_exact():
    # class 0: positives at sorted ranks 1 (0.9) → AP 1. class 1: no positive → left out.
    # class 2: scores 0.7(+), 0.3(+), 0.1(+), 0.0(−) → AP 1.
    assert mean_average_precision(SCORES, LABELS) == 1.0
    # class 0 ranks the positive (sample 0) second behind sample 3: AP 1/2. class 2: positives 1, 2 at
    # ranks 2 and 1, 3 at rank 4 behind sample 0: AP (1 + 1 + 3/4) / 3.
    scores = SCORES.clone()
    scores[3, 0] = 0.95
    scores[0, 2] = 0.2
    expected = (0.5 + (1 + 1 + 3 / 4) / 3) / 2
    assert mean_average_precision(scores, LABELS) == pytest.approx(expected, abs=1e-12)


def test_mean_average_precision_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60, 5), generator=generator).double()  # many ties
    labels = torch.randint(0, 5, (60,), generator=generator)
    expected = np.mean([metrics.average_precision_score((labels == k).numpy(), scores[:, k].numpy())
                        for k in range(5)])
    assert mean_average_precision(scores, labels) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("call, args, match", [
    (accuracy, (SCORES, torch.tensor([0, 1, 2])), "vector of 4 class indices"),
    (accuracy, (SCORES, torch.tensor([0, 1, 3, 0])), r"index the 3 score columns"),
    (accuracy, (SCORES, LABELS.float()), "integer class indices"),
    (top_k_accuracy, (SCORES, LABELS, 4), r"k must lie in 1…3"),
    (mean_average_precision, (SCORES[:0], LABELS[:0]), "no class has a positive"),
])
def test_metric_errors(call, args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(*args)


def separable_problem(per_class=20, classes=3, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator) * 5
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=generator) * 0.5, labels


@pytest.mark.parametrize("solver", ["newton", "liblinear"])
def test_svm_separates_separable_classes(solver):
    pytest.importorskip("sklearn")
    train_x, train_y = separable_problem(seed=0)
    test_x, test_y = separable_problem(per_class=10, seed=0)
    svm = train_svm(normalize(train_x), train_y, solver=solver)
    assert svm.C == 100
    scores = svm.decision_function(normalize(test_x))
    assert scores.shape == (30, 3)
    assert accuracy(scores, test_y) == 1.0 and mean_average_precision(scores, test_y) == 1.0
    assert torch.equal(svm.predict(normalize(test_x)), test_y)


@pytest.mark.parametrize("solver", ["newton", "liblinear"])
def test_svm_two_classes_gives_a_column_per_class(solver):
    pytest.importorskip("sklearn")
    x, y = separable_problem(classes=2)
    scores = LinearSVM(solver=solver).fit(x, y).decision_function(x)
    assert scores.shape == (40, 2)
    assert accuracy(scores, y) == 1.0
    with pytest.raises(ValueError, match="at least two classes"):
        LinearSVM().fit(x[:5], y[:5])


def svm_objective(svm, x, y, C=100.0):
    """The LinearSVC objective Σ_k ½‖(w_k, b_k)‖² + C Σ_i max(0, 1 − y_ik s_ik)², from the decision scores."""
    scores = svm.decision_function(x).double()
    targets = torch.where(y[:, None] == torch.arange(scores.shape[1])[None, :], 1.0, -1.0).double()
    if svm.solver == "liblinear":
        weights = torch.from_numpy(np.concatenate([svm.liblinear_.coef_, svm.liblinear_.intercept_[:, None]], 1))
    else:
        weights = svm.weights_.t().double()
    return 0.5 * weights.square().sum() + C * (1 - targets * scores).clamp_min(0).square().sum()


def test_newton_solver_reaches_liblinears_optimum():
    """Overlapping classes (the hard case at C = 100): same objective value, same predictions."""
    pytest.importorskip("sklearn")
    generator = torch.Generator().manual_seed(3)
    x = normalize(torch.rand(300, 40, generator=generator))
    y = torch.randint(0, 4, (300,), generator=generator)
    x[y == 1, :5] += 0.05
    newton = LinearSVM(solver="newton").fit(x, y)
    liblinear = LinearSVM(solver="liblinear", tol=1e-6, max_iter=100000).fit(x, y)
    best = svm_objective(liblinear, x, y)
    assert abs(float(svm_objective(newton, x, y) / best) - 1) <= 1e-4
    agree = (newton.predict(x) == liblinear.predict(x)).double().mean()
    assert agree >= 0.98


def test_svm_refuses_use_before_fit_and_other_widths():
    from sklearn.exceptions import NotFittedError

    x, y = separable_problem(classes=2)
    with pytest.raises(NotFittedError, match="not fitted yet; call fit"):
        LinearSVM().predict(x)
    svm = LinearSVM().fit(x, y)
    with pytest.raises(ValueError, match=f"X has {x.shape[1] + 1} features but LinearSVM was fitted with {x.shape[1]}"):
        svm.decision_function(torch.cat([x, x[:, :1]], 1))
    assert isinstance(svm.predict(x.numpy()), np.ndarray) and isinstance(svm.predict(x), torch.Tensor)

