"""PCA, Random Maclaurin and the release's dataset-level normalisation on feature matrices (fvkernels.evaluation.
compression): each against what it promises (scikit-learn's PCA, the kernel it estimates, unit column norms),
torch and numpy in and out, fitted on training data and applied to test, refusing what it cannot take."""
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.pipeline import make_pipeline

from fvkernels.evaluation import DatasetNormalization, LinearSVM, PCACompression, RandomMaclaurin
from fvkernels.evaluation.features import NotFitted

from tests.helpers import relative_error


def low_rank_features(rows=300, dim=90, rank=12, seed=0):
    """Vectors near a rank-`rank` subspace with decaying spectrum, plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))[0]
    weights = torch.randn(rows, rank, generator=generator, dtype=torch.float64) * torch.logspace(1, -1, rank,
                                                                                                  dtype=torch.float64)
    return weights @ basis.t() + 0.01 * torch.randn(rows, dim, generator=generator, dtype=torch.float64) + 3.0


def test_pca_matches_scikit_learn_on_the_leading_components():
    x = low_rank_features()
    ours = PCACompression(5).fit(x)
    theirs = PCA(5, svd_solver="full").fit(x.numpy())
    assert relative_error(ours.explained_variance_, torch.from_numpy(theirs.explained_variance_)) <= 1e-8
    # the same subspace, component by component (up to sign)
    overlap = (ours.components_ @ torch.from_numpy(theirs.components_).t()).abs().diagonal()
    assert torch.allclose(overlap, torch.ones(5, dtype=torch.float64), atol=1e-8)
    projected = ours.transform(x)
    assert relative_error(projected.abs(), torch.from_numpy(np.abs(theirs.transform(x.numpy())))) <= 1e-8


def test_whitened_pca_gives_unit_variance_on_training_data_and_applies_to_test():
    train, test = low_rank_features(seed=0), low_rank_features(seed=1)
    pca = PCACompression(6, whiten=True).fit(train)
    assert torch.allclose(pca.transform(train).var(0), torch.ones(6, dtype=torch.float64), atol=1e-8)
    assert pca.transform(test).shape == (300, 6)


def test_random_maclaurin_estimates_its_kernel_without_bias():
    generator = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(40, 64, generator=generator, dtype=torch.float64), dim=1)
    for degree in (1, 2):
        exact = (x @ x.t()) ** degree
        estimates = torch.stack([(lambda f: f @ f.t())(RandomMaclaurin(2048, degree=degree, seed=seed).fit_transform(x))
                                 for seed in range(8)])
        # each estimate is close; their mean closer (unbiased): errors shrink like 1/√(components · draws)
        assert (estimates[0] - exact).abs().max() <= 0.25
        assert (estimates.mean(0) - exact).abs().max() <= 0.1
    assert RandomMaclaurin(16, seed=5).fit(x).transform(x).shape == (40, 16)
    assert torch.equal(RandomMaclaurin(16, seed=5).fit_transform(x), RandomMaclaurin(16, seed=5).fit_transform(x))


def test_dataset_normalization_gives_unit_column_norms_on_training_data():
    train = low_rank_features(seed=0)
    train[:, 7] = 0  # a dimension no training vector uses stays as it is
    normalizer = DatasetNormalization().fit(train)
    norms = normalizer.transform(train).norm(dim=0)
    assert torch.allclose(norms[torch.arange(90) != 7], torch.ones(89, dtype=torch.float64))
    assert norms[7] == 0 and normalizer.scale_[7] == 1
    test = low_rank_features(seed=2)
    assert torch.allclose(normalizer.transform(test), test / train.norm(dim=0).where(train.norm(dim=0) > 0,
                                                                                    torch.ones(90, dtype=torch.float64)))


@pytest.mark.parametrize("make", [lambda: PCACompression(4), lambda: RandomMaclaurin(8), DatasetNormalization])
def test_numpy_in_numpy_out_estimator_protocol_and_refusals(make):
    x = low_rank_features(rows=50, dim=20)
    transformer = make()
    with pytest.raises(NotFitted, match="call fit"):
        transformer.transform(x)
    out = transformer.fit_transform(x.numpy())
    assert isinstance(out, np.ndarray) and out.shape[0] == 50
    assert isinstance(transformer.transform(x), torch.Tensor)
    assert clone(transformer).get_params() == transformer.get_params()
    with pytest.raises(ValueError, match="X has 19 features, but .* is expecting 20 features as input"):
        transformer.transform(x[:, :19])
    bad = x.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"features rows \[3\]"):
        clone(transformer).fit(bad)


def test_options_out_of_range_are_refused_by_name():
    x = low_rank_features(rows=10, dim=20)
    with pytest.raises(ValueError, match="n_components = 11 needs at least that many training vectors"):
        PCACompression(11).fit(x)
    with pytest.raises(ValueError, match="n_components must be a whole number ≥ 1, got 0"):
        RandomMaclaurin(0).fit(x)
    with pytest.raises(ValueError, match="degree must be a whole number ≥ 1"):
        RandomMaclaurin(4, degree=0).fit(x)
    with pytest.raises(TypeError, match="whiten must be True or False"):
        PCACompression(2, whiten="yes").fit(x)


def test_compressed_vectors_still_separate_classes_in_a_pipeline():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(800) % 2
    x = torch.randn(800, 400, generator=generator) + 1.5 * labels[:, None].float() * torch.linspace(-1, 1, 400)
    for compression in (PCACompression(16), RandomMaclaurin(128)):
        model = make_pipeline(compression, LinearSVM(C=1.0)).fit(x[:600].numpy(), labels[:600].numpy())
        assert model.score(x[600:].numpy(), labels[600:].numpy()) >= 0.95, type(compression).__name__


# scikit-learn's estimator checks that do not apply: complex input is refused as a TypeError ("features must be
# real"), not the ValueError the check expects, as everywhere in fvkernels.evaluation.
NOT_APPLICABLE = {"check_complex_data"}


@pytest.mark.parametrize("transformer", [PCACompression(1), RandomMaclaurin(4), DatasetNormalization()],
                         ids=lambda t: type(t).__name__)
def test_scikit_learn_estimator_checks(transformer):
    import warnings

    from sklearn.utils.estimator_checks import check_estimator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(transformer, on_fail=None)
    failed = {result["check_name"]: str(result["exception"])[:300] for result in results
              if result["status"] == "failed" and result["check_name"] not in NOT_APPLICABLE}
    assert len(results) > 40 and not failed, failed


def test_fvvae_encoder_with_the_release_dataset_normalisation():
    """scaling="dataset": raw vectors (no Fisher) divided by each dimension's L2 norm over the training sets, then
    the improved normalisation — the same trained layer as scaling="fisher", and the same vectors."""
    import dataclasses

    from fvkernels import fv_vae_encode
    from fvkernels.common.tensors import improved_normalisation
    from fvkernels.evaluation import FVVAEEncoder
    generator = torch.Generator().manual_seed(0)
    train_sets, test_sets = (torch.rand(n, 20, 6, generator=generator, dtype=torch.float64) for n in (24, 7))
    options = dict(iterations=4, batch_size=8, progress=False, seed=3)
    fisher = FVVAEEncoder(3, (5,), **options).fit(train_sets)
    dataset = FVVAEEncoder(3, (5,), scaling="dataset", **options).fit(train_sets)
    params = dataclasses.replace(dataset.model_.to_params(), fisher=None)
    raw_train = fv_vae_encode(train_sets, params, normalize=False)
    assert torch.allclose(dataset.dataset_scale_, raw_train.norm(dim=0).where(raw_train.norm(dim=0) > 0,
                                                                               torch.ones(24, dtype=torch.float64)))
    expected = improved_normalisation(fv_vae_encode(test_sets, params, normalize=False) / dataset.dataset_scale_)
    assert relative_error(dataset.transform(test_sets), expected) <= 1e-12
    assert torch.equal(fisher.model_.decoder.weight, dataset.model_.decoder.weight)  # one layer, two scalings
    # The diagonal Fisher is the mean of G² over the same training sets: 1/√F and 1/‖G‖ differ by √N, a constant
    # factor that the L2 normalisation removes — the two scalings give the same vectors (the Fisher's floor aside).
    assert relative_error(dataset.transform(test_sets), fisher.transform(test_sets)) <= 1e-10
    with pytest.raises(ValueError, match="scaling must be 'fisher' .* or 'dataset'"):
        FVVAEEncoder(3, (5,), scaling="global", **options).fit(train_sets)
