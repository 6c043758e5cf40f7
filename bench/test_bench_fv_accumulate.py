"""fv_accumulate (DESIGN §1.5–6) per provider: video frames, images, whole videos and a sweep over T."""
import pytest
import torch

from fvkernels.ops.reference import fv_accumulate_reference

from bench.cases import FV_ACCUMULATE_CASES, fv_accumulate_flops, fv_accumulate_inputs, tensor_bytes, valid_descriptors
from bench.measure import TOLERANCE, relative_error
from bench.providers import PROVIDERS, fv_accumulate_fn


@pytest.mark.parametrize("provider", PROVIDERS, ids=str)
@pytest.mark.parametrize("case", FV_ACCUMULATE_CASES, ids=lambda case: case.key)
def test_fv_accumulate(benchmark, bench, case, provider):
    bench.require(provider)
    case = bench.sized(case)
    inputs = fv_accumulate_inputs(case, provider.device, provider.dtype)
    expected = fv_accumulate_reference(*fv_accumulate_inputs(case, provider.device, torch.float32))
    accumulate = fv_accumulate_fn(provider, bench.full)

    out = bench.first_call(benchmark, provider, lambda: accumulate(*inputs))
    error = relative_error(out, expected)
    assert error <= TOLERANCE[provider.dtype], f"{provider} differs from the torch composite by {error:.2e}"

    descriptors = valid_descriptors(case, inputs[-1])
    bench.time(benchmark, provider, case, lambda: accumulate(*inputs), flops=fv_accumulate_flops(case, descriptors),
               nbytes=tensor_bytes(*inputs, out), descriptors=descriptors)
