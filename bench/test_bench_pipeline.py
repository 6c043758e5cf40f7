"""The whole pipeline on images (T=784, batch 16): fv_vae_encode per backend against a plain torch pipeline
(eager and compiled) and against the classic peer, VLFeat's improved Fisher vector at the same dimension."""
import pytest
import torch

from bench.cases import PIPELINE_CASE, pipeline_flops, pipeline_inputs, tensor_bytes, vlfeat_gmm
from bench.measure import TOLERANCE, peak_extra_bytes, relative_error
from bench.providers import PROVIDERS, VLFEAT_PROVIDER, eager_fv_vae_pipeline, pipeline_fn, vlfeat_improved_fisher


def signed_square(fv):
    """Undoes the signed square root: v/‖v‖₁ of the improved FV, linear in the raw FV, so that comparing it is
    not dominated by the square roots of entries near zero."""
    return fv * fv.abs()


@pytest.mark.parametrize("provider", PROVIDERS, ids=str)
def test_fv_vae_encode(benchmark, bench, provider):
    bench.require(provider)
    case = bench.sized(PIPELINE_CASE)
    descriptors, params = pipeline_inputs(case, provider.device, provider.dtype)
    expected = eager_fv_vae_pipeline(*pipeline_inputs(case, provider.device, torch.float32))
    encode = pipeline_fn(provider, params, bench.full)

    out = bench.first_call(benchmark, provider, lambda: encode(descriptors))
    error = relative_error(signed_square(out), signed_square(expected))
    assert error <= TOLERANCE[provider.dtype], f"{provider} differs from the torch pipeline by {error:.2e}"

    count = case.sets * case.set_size
    bench.time(benchmark, provider, case, lambda: encode(descriptors), flops=pipeline_flops(case, params, count),
               nbytes=tensor_bytes(descriptors, *params.tensors(), out), descriptors=count)
    benchmark.extra_info["output_bytes"] = tensor_bytes(out)
    benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(lambda: encode(descriptors), provider.device,
                                                                allocates_output=not provider.reuse_output)


def test_vlfeat_fisher(benchmark, bench):
    bench.require(VLFEAT_PROVIDER)
    case = bench.sized(PIPELINE_CASE)
    descriptors, _ = pipeline_inputs(case, "cpu", torch.float32)
    gmm = vlfeat_gmm(case)

    out = bench.first_call(benchmark, VLFEAT_PROVIDER, lambda: vlfeat_improved_fisher(descriptors, gmm))
    assert out.shape == (case.sets, 2 * gmm[0].size) and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.norm(dim=1), torch.ones(case.sets), rtol=1e-4, atol=0)

    count = case.sets * case.set_size
    # FLOPs are left out: VLFeat computes a different model, so only its time compares.
    bench.time(benchmark, VLFEAT_PROVIDER, case, lambda: vlfeat_improved_fisher(descriptors, gmm), flops=None,
               nbytes=tensor_bytes(descriptors, *map(torch.from_numpy, gmm), out), descriptors=count)
