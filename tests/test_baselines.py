"""Baseline set encoders against plain loop references, VLFeat's vl_fisher, and their own contracts."""
import math

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from fvkernels.evaluation.clustering import DiagonalGMM, fit_gmm, kmeans
from fvkernels.evaluation.encoders import AverageEncoder, BilinearEncoder, ConcatEncoder, GMMFisherEncoder, VLADEncoder
from fvkernels.evaluation.sets import DescriptorSets

CHANNELS = 5


def mixture_descriptors(count, channels=CHANNELS, components=3, seed=0, dtype=torch.float64):
    """Descriptors from a mixture of well separated Gaussians, and the true component means."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(components, channels, generator=generator, dtype=dtype) * 4
    labels = torch.randint(components, (count,), generator=generator)
    scales = torch.rand(components, channels, generator=generator, dtype=dtype) + 0.3
    return centres[labels] + torch.randn(count, channels, generator=generator, dtype=dtype) * scales[labels], centres


def ragged_sets(lengths=(17, 0, 9, 23, 1, 12), seed=1):
    descriptors, _ = mixture_descriptors(sum(lengths), seed=seed)
    return list(descriptors.split(list(lengths)))


def signed_sqrt_l2(vector):
    rooted = np.sign(vector) * np.sqrt(np.abs(vector))
    return rooted / max(np.linalg.norm(rooted), 1e-12)


# ---- plain references: one set at a time, loops over descriptors -----------------------------------------

def reference_fisher(x, means, variances, priors, improved=True):
    x, means, variances, priors = (np.asarray(a, dtype=np.float64) for a in (x, means, variances, priors))
    count, channels = x.shape
    components = len(priors)
    u, v = np.zeros((components, channels)), np.zeros((components, channels))
    for t in range(count):
        log_joint = [math.log(priors[k]) - 0.5 * sum(math.log(2 * math.pi * variances[k, d]) +
                                                      (x[t, d] - means[k, d]) ** 2 / variances[k, d]
                                                      for d in range(channels)) for k in range(components)]
        top = max(log_joint)
        posteriors = [math.exp(value - top) for value in log_joint]
        total = sum(posteriors)
        for k in range(components):
            q = posteriors[k] / total
            if priors[k] < 1e-6 or q < 1e-6:
                continue
            diff = (x[t] - means[k]) / np.sqrt(variances[k])
            u[k] += q * diff
            v[k] += q * (diff ** 2 - 1)
    for k in range(components):
        if count:
            u[k] /= count * math.sqrt(priors[k])
            v[k] /= count * math.sqrt(2 * priors[k])
    fv = np.concatenate([u.ravel(), v.ravel()])
    return signed_sqrt_l2(fv) if improved else fv


def reference_vlad(x, centers, intra=True, improved=True):
    x, centers = np.asarray(x), np.asarray(centers)
    vlad = np.zeros_like(centers)
    for descriptor in x:
        nearest = int(np.argmin([np.sum((descriptor - c) ** 2) for c in centers]))
        vlad[nearest] += descriptor - centers[nearest]
    if intra:
        for k in range(len(centers)):
            vlad[k] /= max(np.linalg.norm(vlad[k]), 1e-12)
    vlad = vlad.ravel()
    return signed_sqrt_l2(vlad) if improved else vlad


def reference_bilinear(x, improved=True):
    x = np.asarray(x)
    pooled = np.zeros((x.shape[1], x.shape[1]))
    for descriptor in x:
        pooled += np.outer(descriptor, descriptor)
    pooled = (pooled / max(len(x), 1)).ravel()
    return signed_sqrt_l2(pooled) if improved else pooled


def assert_rows_close(actual, expected_rows, atol=1e-10):
    np.testing.assert_allclose(actual.numpy(), np.stack(expected_rows), rtol=0, atol=atol)


# ---- encoders against the references ---------------------------------------------------------------------

def test_average_and_concat():
    sets = ragged_sets()
    averages = AverageEncoder().fit_transform(sets)
    assert_rows_close(averages, [s.numpy().mean(0) if len(s) else np.zeros(CHANNELS) for s in sets])
    assert AverageEncoder().fit(sets).dim == CHANNELS

    fixed = torch.randn(4, 6, CHANNELS, dtype=torch.float64)
    encoder = ConcatEncoder().fit(fixed)
    assert encoder.dim == 6 * CHANNELS
    assert_rows_close(encoder.transform(fixed), [np.concatenate([row for row in s.numpy()]) for s in fixed], 0)


@pytest.mark.parametrize("improved", [True, False])
def test_gmm_fisher_matches_loop_reference(improved):
    sets = ragged_sets()
    encoder = GMMFisherEncoder(3, normalize=improved, seed=0).fit(sets)
    gmm = encoder.gmm_
    assert encoder.dim == 2 * 3 * CHANNELS
    expected = [reference_fisher(s.numpy(), gmm.means, gmm.variances, gmm.priors, improved) for s in sets]
    assert_rows_close(encoder.transform(sets), expected)
    assert not encoder.transform(sets)[1].any()  # the empty set


def test_gmm_fisher_skips_negligible_priors_like_vlfeat():
    means = torch.tensor([[0.0, 0.0], [3.0, 3.0], [2.9, 3.1]], dtype=torch.float64)
    gmm = DiagonalGMM(means, torch.ones_like(means), torch.tensor([0.6, 0.4 - 1e-8, 1e-8], dtype=torch.float64))
    x = torch.tensor([[0.1, -0.2], [2.9, 3.2], [3.1, 2.8]], dtype=torch.float64)
    fv = GMMFisherEncoder.from_gmm(gmm, normalize=False).transform(x[None])[0]
    expected = reference_fisher(x.numpy(), gmm.means, gmm.variances, gmm.priors, improved=False)
    np.testing.assert_allclose(fv.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert not fv.view(2, 3, 2)[:, 2].any()


@pytest.mark.parametrize("intra", [True, False])
def test_vlad_matches_loop_reference(intra):
    sets = ragged_sets()
    encoder = VLADEncoder(4, intra_normalization=intra, seed=0).fit(sets)
    assert encoder.dim == 4 * CHANNELS
    expected = [reference_vlad(s.numpy(), encoder.centers_.numpy(), intra) for s in sets]
    assert_rows_close(encoder.transform(sets), expected)


def test_bilinear_matches_loop_reference_and_triangle_is_isometric():
    sets = ragged_sets()
    full = BilinearEncoder().fit(sets)
    assert full.dim == CHANNELS ** 2
    assert_rows_close(full.transform(sets), [reference_bilinear(s.numpy()) for s in sets])
    raw = BilinearEncoder(normalize=False).fit_transform(sets)
    assert_rows_close(raw, [reference_bilinear(s.numpy(), improved=False) for s in sets])

    for normalize in (True, False):
        square = BilinearEncoder(normalize=normalize).fit_transform(sets)
        triangle_encoder = BilinearEncoder(full=False, normalize=normalize).fit(sets)
        triangle = triangle_encoder.transform(sets)
        assert triangle_encoder.dim == triangle.shape[1] == CHANNELS * (CHANNELS + 1) // 2
        # atol: the signed square root turns rounding-level asymmetry of near-zero entries into ~1e-9
        torch.testing.assert_close(triangle @ triangle.t(), square @ square.t(), rtol=1e-12, atol=1e-7)


# ---- VLFeat ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("improved", [True, False])
def test_gmm_fisher_matches_vlfeat(dtype, tolerance, improved):
    cyvlfeat_fisher = pytest.importorskip("cyvlfeat.fisher").fisher
    sets = [s.to(dtype) for s in ragged_sets(lengths=(40, 7, 25, 60))]
    encoder = GMMFisherEncoder(4, normalize=improved, seed=3).fit(sets)
    gmm = encoder.gmm_
    numpy_gmm = [t.to(dtype).numpy() for t in (gmm.means, gmm.variances, gmm.priors)]
    expected = [cyvlfeat_fisher(s.numpy(), *numpy_gmm, improved=improved) for s in sets]
    actual = encoder.transform(sets)
    assert actual.dtype == dtype
    scale = max(np.abs(e).max() for e in expected)
    assert_rows_close(actual.double() / scale, [e / scale for e in expected], atol=tolerance)


def test_float32_sets_are_encoded_accurately():
    """Post-ReLU activations: many zeros, GMM components with floored variances far from the origin,
    where the GEMM expansion of (x − µ)²/σ² cancels in float32 (the reason for compute_dtype)."""
    generator = torch.Generator().manual_seed(0)
    maps = (torch.randn(12, 49, 32, generator=generator) * 1.5 + 0.5).relu()
    encoder = GMMFisherEncoder(8, seed=0, max_iterations=20).fit(maps)
    exact = encoder.transform(maps.double())
    fast = GMMFisherEncoder.from_gmm(encoder.gmm_, compute_dtype=None).transform(maps)
    accurate = encoder.transform(maps)
    assert accurate.dtype == fast.dtype == torch.float32
    assert (accurate.double() - exact).abs().max() < 1e-6 * exact.abs().max()
    assert (fast.double() - exact).abs().max() > 100 * (accurate.double() - exact).abs().max()


# ---- fitting ---------------------------------------------------------------------------------------------

def test_em_increases_log_likelihood_and_finds_the_components():
    descriptors, centres = mixture_descriptors(1500, components=3, seed=4)
    gmm, history = fit_gmm(descriptors, 3, max_iterations=60, tolerance=0, seed=0)
    assert 3 <= len(history) <= 60  # tolerance 0: runs until an iteration gains nothing
    steps = np.diff(history)
    assert (steps >= -1e-10).all(), steps.min()
    assert history[-1] > history[0] + 0.1
    nearest_true = torch.cdist(gmm.means, centres).min(1).values
    assert (nearest_true < 0.3).all()  # well separated (±4σ) components are recovered
    torch.testing.assert_close(gmm.priors.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_gmm_variance_floor_keeps_dead_channels_finite():
    descriptors, _ = mixture_descriptors(400, seed=5)
    descriptors[:, 2] = 0  # a channel that is constant zero, as after a ReLU
    encoder = GMMFisherEncoder(3, variance_floor=1e-4, seed=0).fit(descriptors.view(20, 20, CHANNELS))
    floor = 1e-4 * descriptors.var(0, unbiased=False).max()
    assert torch.allclose(encoder.gmm_.variances[:, 2], floor.expand(3))
    assert torch.isfinite(encoder.transform(descriptors.view(20, 20, CHANNELS))).all()


def test_kmeans_inertia_decreases_and_centres_are_found():
    descriptors, centres = mixture_descriptors(900, components=4, seed=6)
    found, inertias = kmeans(descriptors, 4, max_iterations=50, tolerance=0, seed=0)
    assert (np.diff(inertias) <= 1e-9).all()
    assert (torch.cdist(found, centres).min(1).values < 0.3).all()


@pytest.mark.parametrize("make", [lambda: GMMFisherEncoder(3, seed=7), lambda: VLADEncoder(3, seed=7)])
def test_fits_are_deterministic(make):
    sets = ragged_sets()
    assert torch.equal(make().fit_transform(sets), make().fit_transform(sets))


def test_fit_subsamples_descriptors_from_the_sets():
    sets = ragged_sets()
    data = DescriptorSets(sets)
    sample = data.sample(10, torch.Generator().manual_seed(0))
    everything = torch.cat(sets)
    assert sample.shape == (10, CHANNELS)
    assert all((everything == row).all(1).any() for row in sample)
    assert len({tuple(row.tolist()) for row in sample}) == 10
    tensor_sample = DescriptorSets(torch.stack(sets[2:3] * 3)).sample(5, torch.Generator().manual_seed(0))
    assert all((sets[2] == row).all(1).any() for row in tensor_sample)


# ---- input forms, chunking, devices ----------------------------------------------------------------------

ENCODERS = [AverageEncoder, ConcatEncoder, lambda: GMMFisherEncoder(3), lambda: VLADEncoder(3), BilinearEncoder,
            lambda: BilinearEncoder(full=False)]


@pytest.mark.parametrize("make", ENCODERS)
def test_input_forms_and_chunks_agree(make, monkeypatch):
    maps = torch.randn(7, CHANNELS, 3, 4, dtype=torch.float64).relu()
    sets = maps.flatten(2).transpose(1, 2)
    encoder = make().fit(sets)
    expected = encoder.transform(sets)
    assert expected.shape == (7, encoder.dim)
    torch.testing.assert_close(encoder.transform(maps), expected, rtol=0, atol=0)
    torch.testing.assert_close(encoder.transform(list(sets)), expected, rtol=1e-12, atol=1e-14)
    monkeypatch.setattr("fvkernels.evaluation.sets.CHUNK_ELEMENTS", 1)  # one set per chunk
    torch.testing.assert_close(encoder.transform(sets), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(encoder.transform(list(sets)), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("make", ENCODERS)
def test_cuda_follows_the_input(make):
    sets = torch.randn(6, 12, CHANNELS, dtype=torch.float64)
    encoder = make().fit(sets.cuda())
    out = encoder.transform(sets.cuda())
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), encoder.transform(sets), rtol=1e-9, atol=1e-12)


# ---- errors ----------------------------------------------------------------------------------------------

def test_errors_say_what_was_expected():
    sets = torch.randn(4, 6, CHANNELS)
    encoder = AverageEncoder()
    with pytest.raises(NotFittedError, match="not fitted yet; call fit"):
        encoder.transform(sets)
    encoder.fit(sets)
    with pytest.raises(ValueError, match="C = 7 but AverageEncoder was fitted on C = 5"):
        encoder.transform(torch.randn(2, 6, 7))
    with pytest.raises(ValueError, match=r"\(N, T, C\) tensor.*shape \(6, 5\)"):
        encoder.transform(torch.randn(6, 5))
    with pytest.raises(TypeError, match="floating"):
        encoder.fit(torch.ones(2, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"sets\[1\] has C = 4"):
        encoder.fit([torch.randn(3, 5), torch.randn(3, 4)])
    with pytest.raises(ValueError, match=r"sets \[1\] \(indices\) hold NaN or Inf descriptors"):
        encoder.transform(torch.stack([sets[0], torch.full_like(sets[1], float("nan"))]))
    with pytest.raises(ValueError, match="fitted on T = 6"):
        ConcatEncoder().fit(sets).transform(torch.randn(2, 5, CHANNELS))
    with pytest.raises(ValueError, match="one size T"):
        ConcatEncoder().fit([torch.randn(3, 5), torch.randn(4, 5)])
    with pytest.raises(ValueError, match="cannot fit 30 GMM components"):
        GMMFisherEncoder(30).fit(sets)
    with pytest.raises(ValueError, match="all descriptors are identical"):
        GMMFisherEncoder(2).fit(torch.ones(2, 4, 3))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"num_clusters must be a whole number ≥ 1, got {bad!r}"):
            VLADEncoder(bad).fit(sets)


def test_fvvae_encoder_trains_fits_fisher_and_encodes():
    from fvkernels import fv_vae_encode
    from fvkernels.baselines import FVVAEEncoder

    torch.manual_seed(0)
    maps = torch.relu(torch.randn(24, 6, 3, 3))
    labels = torch.arange(24) % 3
    encoder = FVVAEEncoder(4, (8,), iterations=4, batch_size=8, progress=False)
    fv = encoder.fit_transform(maps, labels)
    model = encoder.model_
    assert encoder.dim == 6 * 5 and fv.shape == (24, 30)
    assert model.classifier is not None and int(model.fisher_sets) == 24 and len(encoder.history_) == 4
    with torch.no_grad():
        assert torch.allclose(fv, fv_vae_encode(maps, model.to_params()), atol=1e-6)
    ragged = [maps[0].flatten(1).t(), maps[1].flatten(1).t()[:5]]
    with torch.no_grad():
        expected = fv_vae_encode(torch.nn.utils.rnn.pad_sequence(ragged, batch_first=True), model.to_params(),
                                 lengths=[9, 5])
    assert torch.allclose(encoder.transform(ragged), expected, atol=1e-6)
    minus = FVVAEEncoder(4, (8,), lambda_cls=0, iterations=2, batch_size=8, progress=False)
    minus.fit(maps, labels)
    assert minus.model_.classifier is None
