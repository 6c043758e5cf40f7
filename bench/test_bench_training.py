"""A training step through the op (forward + backward w.r.t. z, x, W, b, σx⁻²) per provider: the fused kernels
against eager autograd and torch.compile of the torch composite."""
import pytest
import torch

from bench.cases import TRAINING_CASES, fv_accumulate_inputs, tensor_bytes, training_flops, valid_descriptors
from bench.measure import TOLERANCE, relative_error
from bench.providers import EAGER, PROVIDERS, Provider, training_step_fn


def grad_output(case, device, dtype):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(case.sets, case.channels, case.latent + 1, generator=generator).to(device, dtype)


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if not p.reuse_output], ids=str)
@pytest.mark.parametrize("case", TRAINING_CASES, ids=lambda case: case.key)
def test_training_step(benchmark, bench, case, provider):
    bench.require(provider)
    case = bench.sized(case)
    inputs = (*fv_accumulate_inputs(case, provider.device, provider.dtype),
              grad_output(case, provider.device, provider.dtype))
    reference = Provider("torch", provider.device, EAGER)
    expected = training_step_fn(reference, bench.full)(*fv_accumulate_inputs(case, provider.device, torch.float32),
                                                       grad_output(case, provider.device, torch.float32))
    step = training_step_fn(provider, bench.full)

    grads = bench.first_call(benchmark, provider, lambda: step(*inputs))
    # Judged against the float32 composite next to the eager composite's own error in the provider's dtype
    # (flash-attention's rule): bfloat16 inputs alone move the gradients by a few percent.
    composite = training_step_fn(reference, bench.full)(*inputs)
    for name, got, low, want in zip(("z", "x", "dec_weight", "dec_bias", "inv_sigma2"), grads, composite, expected):
        error, allowed = relative_error(got, want), max(TOLERANCE[provider.dtype], 2 * relative_error(low, want))
        assert error <= allowed, f"{provider}'s grad of {name} differs by {error:.2e} (allowed {allowed:.2e})"

    descriptors = valid_descriptors(case, inputs[6])
    bench.time(benchmark, provider, case, lambda: step(*inputs), flops=training_flops(case, descriptors),
               nbytes=tensor_bytes(*inputs[:7], *grads), descriptors=descriptors)
