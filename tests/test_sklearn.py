"""The set encoders as scikit-learn estimators: parameters (get_params, set_params, clone), fit(X, y=None),
numpy or torch in and the same kind out, Pipeline and GridSearchCV, and scikit-learn's own estimator checks
where they apply.

Which of sklearn.utils.estimator_checks apply: the checks of the estimator object (construction, parameters,
cloning, repr, tags, mixin order, unfitted use) run as they are. The checks that fit and transform
generate 2-D (n_samples, n_features) data, which is not a set of descriptors: an encoder's sample is a (T, C)
set. Their substance (fit returns self, fit is idempotent, does not change the parameters, the fitted encoder
pickles, results do not depend on the order or the subset of samples) is checked below on 3-D sets instead."""
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC
from sklearn.utils import estimator_checks

from fvkernels.evaluation import (
    AverageEncoder,
    BilinearEncoder,
    ConcatEncoder,
    FVVAEEncoder,
    GMMFisherEncoder,
    VLADEncoder,
)

from tests.helpers import relative_error

ENCODERS = [AverageEncoder(), ConcatEncoder(), GMMFisherEncoder(3, seed=1), VLADEncoder(4, seed=1),
            BilinearEncoder(full=False), FVVAEEncoder(3, (6,), iterations=3, batch_size=8, progress=False)]
IDS = [type(encoder).__name__ for encoder in ENCODERS]

OBJECT_CHECKS = ["check_no_attributes_set_in_init", "check_parameters_default_constructible",
                 "check_get_params_invariance", "check_set_params", "check_estimator_cloneable",
                 "check_estimator_repr", "check_do_not_raise_errors_in_init_or_set_params", "check_mixin_order",
                 "check_estimator_tags_renamed", "check_estimators_unfitted"]


@pytest.mark.parametrize("encoder", ENCODERS, ids=IDS)
@pytest.mark.parametrize("check", OBJECT_CHECKS)
def test_scikit_learn_estimator_checks(encoder, check):
    getattr(estimator_checks, check)(type(encoder).__name__, clone(encoder))


def sets_and_labels(seed=0, count=16):
    """Post-ReLU-like (N, T, C) sets whose class shows in which channels are active."""
    generator = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    sets = generator.random((count, 9, 6)).astype(np.float32) * 0.3
    sets[labels == 0, :, :3] += 1.0
    sets[labels == 1, :, 3:] += 1.0
    return sets, labels


def encode(encoder, sets, labels=None):
    return encoder.fit(sets, labels).transform(sets)


@pytest.mark.parametrize("encoder", ENCODERS, ids=IDS)
def test_fit_transform_contract_on_sets(encoder):
    sets, labels = sets_and_labels()
    params = clone(encoder).get_params()
    fitted = clone(encoder)
    assert fitted.fit(sets, labels) is fitted
    assert {key: value for key, value in fitted.get_params().items()} == params  # fit leaves the parameters
    first = fitted.transform(sets)
    assert isinstance(first, np.ndarray) and first.shape == (16, fitted.dim)
    assert np.allclose(encode(clone(encoder), sets, labels), encode(clone(encoder), sets, labels))  # idempotent
    restored = pickle.loads(pickle.dumps(fitted))
    assert np.array_equal(restored.transform(sets), first)
    order = np.random.default_rng(1).permutation(16)
    assert np.allclose(fitted.transform(sets[order]), first[order], atol=1e-6)
    assert np.allclose(fitted.transform(sets[:5]), first[:5], atol=1e-6)
    as_tensor = fitted.transform(torch.from_numpy(sets))
    assert isinstance(as_tensor, torch.Tensor) and relative_error(as_tensor, torch.from_numpy(first)) <= 1e-6
    as_list = fitted.transform(list(sets[:3]))  # a list of (T_i, C) arrays: numpy out too
    assert isinstance(as_list, np.ndarray) and np.allclose(as_list, first[:3], atol=1e-6)


@pytest.mark.parametrize("encoder", [GMMFisherEncoder(2, seed=0), VLADEncoder(3, seed=0), AverageEncoder()],
                         ids=["GMMFisherEncoder", "VLADEncoder", "AverageEncoder"])
def test_pipeline_and_grid_search(encoder):
    sets, labels = sets_and_labels(count=24)
    pipeline = make_pipeline(encoder, LinearSVC(C=100.0))
    assert pipeline.fit(sets, labels).score(sets, labels) == 1.0
    if "num_components" in encoder.get_params() or "num_clusters" in encoder.get_params():
        name = type(encoder).__name__.lower()
        grid = {f"{name}__{key}": [1, 2] for key in encoder.get_params() if key in ("num_components", "num_clusters")}
        search = GridSearchCV(make_pipeline(clone(encoder), LinearSVC(C=100.0)), grid, cv=2).fit(sets, labels)
        assert search.best_score_ == 1.0 and set(search.cv_results_["params"][0]) == set(grid)


@pytest.mark.parametrize("check", OBJECT_CHECKS)
def test_the_linear_svm_is_a_scikit_learn_classifier(check):
    from fvkernels.evaluation import LinearSVM

    getattr(estimator_checks, check)("LinearSVM", LinearSVM())


def test_encoder_and_svm_in_one_pipeline():
    from fvkernels.evaluation import LinearSVM

    sets, labels = sets_and_labels(count=24)
    pipeline = make_pipeline(VLADEncoder(3, seed=0), LinearSVM())
    assert pipeline.fit(sets, labels).score(sets, labels) == 1.0
    assert isinstance(pipeline.predict(sets), np.ndarray)


def test_labels_seeds_ragged_arrays_and_errors():
    from fvkernels.evaluation import LinearSVM

    sets, labels = sets_and_labels(count=24)
    names = np.array(["shirt", "shoe"])[labels]
    encoder = FVVAEEncoder(3, (6,), iterations=3, batch_size=8, progress=False, seed=4)
    first = encoder.fit_transform(sets, names)
    assert list(encoder.classes_) == ["shirt", "shoe"] and encoder.model_.classifier.out_features == 2
    torch.manual_seed(123)  # the global generator does not matter: seed draws the initial weights too
    assert np.array_equal(clone(encoder).fit_transform(sets, names), first)
    svm = LinearSVM().fit(first, names)
    assert list(svm.predict(first)) == list(names)
    ragged = np.empty(3, dtype=object)
    ragged[:] = [sets[0], sets[1][:4], sets[2][:7]]
    averages = AverageEncoder().fit_transform(ragged)
    assert isinstance(averages, np.ndarray) and np.allclose(averages[1], sets[1][:4].mean(0), atol=1e-6)
    assert GMMFisherEncoder(2.0, seed=0).fit(sets).dim == 2 * 2 * 6  # a whole number given as a float
    with pytest.raises(RuntimeError, match="not fitted yet"):  # NotFittedError, and the RuntimeError it was
        VLADEncoder().transform(sets)
