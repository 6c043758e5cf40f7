"""The evaluation layer lets nothing non-finite pass and says what is wrong: NaN or ±Inf in the sets, features,
labels or scores is refused naming where it is; a fit or an encoding that overflows on finite inputs raises instead
of returning garbage; misuse of LinearSVM (before fit, another width, unusable labels) gets a message for people."""
import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from fvkernels.evaluation import (
    AverageEncoder,
    BilinearEncoder,
    ConcatEncoder,
    FVVAEEncoder,
    GMMFisherEncoder,
    LinearSVM,
    VLADEncoder,
    accuracy,
    encoders,
    mean_average_precision,
    normalize,
    sets,
)
from fvkernels.evaluation.clustering import DiagonalGMM, fit_gmm, kmeans

ENCODERS = [AverageEncoder, ConcatEncoder, lambda: GMMFisherEncoder(2, seed=0), lambda: VLADEncoder(3, seed=0),
            lambda: BilinearEncoder(full=False),
            lambda: FVVAEEncoder(3, (6,), iterations=2, batch_size=4, progress=False)]
ENCODER_IDS = ["AverageEncoder", "ConcatEncoder", "GMMFisherEncoder", "VLADEncoder", "BilinearEncoder", "FVVAEEncoder"]
NONFINITE = [float("nan"), float("inf"), float("-inf")]


def clean_sets(count=8, size=5, channels=4, dtype=torch.float32):
    return torch.rand(count, size, channels, generator=torch.Generator().manual_seed(0), dtype=dtype)


def with_bad_value(sets, index, value, position=(1, 2)):
    poisoned = sets.clone()
    poisoned[(index, *position)] = value
    return poisoned


def as_form(sets, form):
    """The same sets as the encoders take them: a tensor, a numpy array, a list of (T_i, C) tensors."""
    return {"tensor": sets, "numpy": sets.numpy(), "list": list(sets)}[form]


# ---- non-finite inputs are refused, naming the sets ------------------------------------------------------

@pytest.mark.parametrize("make", ENCODERS, ids=ENCODER_IDS)
@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("form", ["tensor", "numpy", "list"])
def test_every_encoder_refuses_nonfinite_sets_in_fit_and_transform(make, value, form):
    poisoned = as_form(with_bad_value(clean_sets(), 5, value), form)
    with pytest.raises(ValueError, match=r"sets \[5\] \(indices\) hold NaN or Inf descriptors; clean or drop"):
        make().fit(poisoned)
    fitted = make().fit(clean_sets())
    with pytest.raises(ValueError, match=r"sets \[5\] \(indices\) hold NaN or Inf descriptors; clean or drop"):
        fitted.transform(poisoned)


def test_nonfinite_sets_are_named_by_their_index_in_a_later_chunk(monkeypatch):
    monkeypatch.setattr(sets, "CHUNK_ELEMENTS", 40)  # two sets of 5 × 4 per chunk
    poisoned = with_bad_value(with_bad_value(clean_sets(), 6, float("nan")), 7, float("inf"), (0, 0))
    with pytest.raises(ValueError, match=r"sets \[6, 7\] \(indices\)"):
        AverageEncoder().fit(clean_sets()).transform(poisoned)
    with pytest.raises(ValueError, match=r"sets \[6, 7\] \(indices\)"):
        AverageEncoder().fit(list(poisoned))


def test_a_nonfinite_descriptor_outside_the_fit_sample_is_refused():
    """A fit subsamples descriptors; a NaN it does not draw is refused all the same (it used to pass unseen)."""
    poisoned = with_bad_value(clean_sets(count=40), 33, float("nan"))
    for encoder in (GMMFisherEncoder(2, max_fit_descriptors=8), VLADEncoder(2, max_fit_descriptors=8)):
        with pytest.raises(ValueError, match=r"sets \[33\]"):
            encoder.fit(poisoned)


def test_clustering_functions_refuse_nonfinite_descriptors():
    descriptors = torch.rand(30, 3, dtype=torch.float64)
    descriptors[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"descriptors \[4\] \(rows\) hold NaN or Inf"):
        fit_gmm(descriptors, 2)
    with pytest.raises(ValueError, match=r"descriptors \[4\] \(rows\) hold NaN or Inf"):
        kmeans(descriptors, 2)


@pytest.mark.parametrize("solver", ["newton", "liblinear"])
def test_the_svm_refuses_nonfinite_features_in_every_method(solver):
    features, labels = torch.randn(12, 3), torch.arange(12) % 2
    poisoned = features.clone()
    poisoned[3, 1], poisoned[9, 0] = float("nan"), float("-inf")
    message = r"features rows \[3, 9\] \(indices\) hold NaN or Inf; clean or drop those rows"
    with pytest.raises(ValueError, match=message):
        LinearSVM(solver=solver).fit(poisoned, labels)
    svm = LinearSVM(solver=solver).fit(features, labels)
    for method in (svm.predict, svm.decision_function, lambda x: svm.score(x, labels)):
        with pytest.raises(ValueError, match=message):
            method(poisoned)
        with pytest.raises(ValueError, match=message):
            method(poisoned.numpy())


def test_metrics_and_normalize_refuse_nonfinite_rows():
    scores, labels = torch.rand(4, 3), torch.tensor([0, 1, 2, 0])
    scores[2, 1] = float("nan")
    for metric in (accuracy, mean_average_precision):
        with pytest.raises(ValueError, match=r"scores rows \[2\] \(indices\) hold NaN or Inf"):
            metric(scores, labels)
    with pytest.raises(ValueError, match=r"features rows \[2\] \(indices\) hold NaN or Inf"):
        normalize(scores.numpy())


# ---- finite inputs that overflow: the result is refused, not returned ------------------------------------

def huge_second_set(value, dtype=torch.float32):
    """Sets 0 and 2 ordinary, set 1 of entries `value`: what overflows in set 1 must not pass, nor blame the others."""
    sets_ = clean_sets(count=3, dtype=dtype)
    sets_[1] = value
    return sets_


@pytest.mark.parametrize("make,value", [
    (AverageEncoder, 3e38),  # the sum of 5 descriptors overflows float32
    (lambda: BilinearEncoder(full=True), 1e20),  # x·xᵀ overflows
    (lambda: VLADEncoder(2, seed=0), 1e20),  # ‖x‖² overflows: no nearest centre
    (lambda: GMMFisherEncoder(2, seed=0, compute_dtype=None), 1e20),  # the posteriors' (x − µ)²/σ² overflow
], ids=["AverageEncoder", "BilinearEncoder", "VLADEncoder", "GMMFisherEncoder"])
def test_encodings_that_overflow_are_refused_naming_the_sets(make, value):
    encoder = make().fit(clean_sets())
    with pytest.raises(ValueError, match=rf"{type(encoder).__name__} encoded sets \[1\] \(indices\) to NaN or Inf "
                                         r"although their descriptors are finite: the encoding overflowed "
                                         r"torch.float32; rescale the descriptors"):
        encoder.transform(huge_second_set(value))
    assert torch.isfinite(encoder.transform(huge_second_set(value, torch.float64))).all()  # float64 is the way out


def test_fits_that_would_overflow_or_underflow_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match=r"variance overflows torch.float32 \(values up to [0-9.]+e\+(19|20)\); "
                                         "divide them by a constant or fit in float64"):
        GMMFisherEncoder(2, compute_dtype="float32").fit(clean_sets() * 1e20)
    with pytest.raises(ValueError, match=r"variance underflows torch.float32 \(they differ by at most .*\); multiply "
                                         "them by a constant or fit in float64"):
        GMMFisherEncoder(2, compute_dtype="float32").fit(clean_sets() * 1e-30)
    with pytest.raises(ValueError, match="all descriptors are identical"):  # not an underflow: nothing to rescale
        GMMFisherEncoder(2, compute_dtype="float32").fit(torch.full((3, 4, 2), 1e-30))
    with pytest.raises(ValueError, match=r"squared norms that overflow torch.float32 \(> 3.4e\+38\); rescale"):
        VLADEncoder(2).fit(clean_sets() * 1e20)
    assert torch.isfinite(GMMFisherEncoder(2).fit(clean_sets() * 1e20).gmm_.variances).all()  # float64 by default


def test_a_fit_that_comes_out_nonfinite_is_refused_naming_the_fitted_tensor(monkeypatch):
    """Whatever the fit (here a k-means that overflowed): its non-finite result is refused, not kept."""
    def overflowed_kmeans(descriptors, num_clusters, **options):
        centres = descriptors[:num_clusters].clone()
        centres[1, 2] = float("inf")
        return centres, [1.0]

    monkeypatch.setattr(encoders, "kmeans", overflowed_kmeans)
    encoder = VLADEncoder(3)
    with pytest.raises(ValueError, match=r"VLADEncoder.centers_ holds \+Inf at index \(1, 2\) \(1 of 12 entries are "
                                         r"NaN or Inf\); the fit overflowed or diverged on finite inputs; rescale"):
        encoder.fit(clean_sets())


def test_svm_features_beyond_float32_and_scores_that_overflow_are_refused():
    features, labels = torch.randn(12, 3, dtype=torch.float64), torch.arange(12) % 2
    huge = features.clone()
    huge[4] *= 1e300  # finite in float64, ±Inf in the solver's float32: it used to stop at zero weights silently
    with pytest.raises(ValueError, match=r"features rows \[4\] \(indices\) exceed float32's range"):
        LinearSVM().fit(huge, labels)
    svm = LinearSVM().fit(features, labels)
    with pytest.raises(ValueError, match=r"features rows \[4\] \(indices\) exceed float32's range"):
        svm.predict(huge)
    svm = LinearSVM().fit(features * 1e-3, labels)  # weights ~ 10³: Σ |w| > 1
    large = features.float().clone()
    large[5] = 3e38 * torch.sign(svm.weights_[:3, 0])  # each feature is finite, their weighted sum is not
    with pytest.raises(ValueError, match=r"the scores of rows \[5\] \(indices\) overflowed float32 although their "
                                         "features are finite; rescale the features"):
        svm.decision_function(large)


def test_a_gmm_must_be_finite_with_positive_variances():
    means, variances, priors = torch.zeros(3, 2), torch.ones(3, 2), torch.full((3,), 1 / 3)
    for field, index, named in (("means", (0, 1), r"\(0, 1\)"), ("variances", (1, 0), r"\(1, 0\)"), ("priors", 2, "2")):
        values = dict(means=means.clone(), variances=variances.clone(), priors=priors.clone())
        values[field][index] = float("nan")
        with pytest.raises(ValueError, match=rf"the GMM's {field} holds NaN at index {named} \(1 of"):
            DiagonalGMM(**values)
    underflowed = variances.clone()
    underflowed[1, 0] = 0.0
    with pytest.raises(ValueError, match=r"variances must be positive, but components \[1\] have variances down to 0"):
        GMMFisherEncoder.from_gmm(DiagonalGMM(means, underflowed, priors))


# ---- LinearSVM's misuse, in words ------------------------------------------------------------------------

def test_the_svm_before_fit_says_to_call_fit():
    features, labels = torch.randn(6, 3), torch.arange(6) % 2
    for method in (LinearSVM().predict, LinearSVM().decision_function, lambda x: LinearSVM().score(x, labels)):
        with pytest.raises(NotFittedError, match=r"LinearSVM is not fitted yet; call fit\(features, labels\) first"):
            method(features)


@pytest.mark.parametrize("width", [2, 4])
def test_the_svm_refuses_features_of_another_width(width):
    svm = LinearSVM().fit(torch.randn(6, 3), torch.arange(6) % 2)
    message = f"X has {width} features but LinearSVM was fitted with 3 features; encode them with the encoder"
    for method in (svm.predict, svm.decision_function, lambda x: svm.score(x, torch.arange(6) % 2)):
        with pytest.raises(ValueError, match=message):
            method(torch.randn(6, width))


@pytest.mark.parametrize("labels,message", [
    (np.ones(6), r"at least two classes in labels, got only \[1.0\]"),
    (np.array([0, 1, np.nan, 1, 0, np.inf]), r"labels of rows \[2, 5\] \(indices\) are NaN or Inf; drop those rows"),
    (np.array([0, 0.5, 1, 1, 0, 1]), r"labels must be classes, got fractional values \(row 1: 0.5\); a regression"),
    (np.arange(5), r"labels must be a vector of 6 class labels \(one per row\), got shape \(5,\)"),
    (np.zeros((6, 2)), r"labels must be a vector of 6 class labels \(one per row\), got shape \(6, 2\)"),
], ids=["one class", "NaN", "fractional", "too few", "a matrix"])
def test_the_svm_says_what_is_wrong_with_the_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        LinearSVM().fit(torch.randn(6, 3), labels)


def test_whole_float_labels_and_strings_are_classes():
    features = torch.randn(6, 3)
    assert list(LinearSVM().fit(features, np.array([0.0, 1.0, 2.0] * 2)).classes_) == [0.0, 1.0, 2.0]
    assert list(LinearSVM().fit(features, np.array(["a", "b"] * 3)).classes_) == ["a", "b"]


def test_fvvae_encoder_says_what_is_wrong_with_y():
    encoder = FVVAEEncoder(3, (6,), iterations=2, batch_size=4, progress=False)
    with pytest.raises(ValueError, match=r"y of rows \[1\] \(indices\) are NaN or Inf"):
        encoder.fit(clean_sets(), np.array([0, np.nan, 1, 0, 1, 0, 1, 0]))
    with pytest.raises(ValueError, match=r"y must be a vector of 8 class labels \(one per row\), got shape \(3,\)"):
        encoder.fit(clean_sets(), np.arange(3))
