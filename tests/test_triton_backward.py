"""The fused Triton backward (fvkernels.ops.triton_fv.backward) under the interpreter against the float64 reference
backward: odd shapes around its tiles (16 rows × 16 channels here), ragged and empty sets, channel-major x, every
option, every subset of gradients, the set groups of the parameter kernel, and a d past its widest tile (the
reference's code then); gradients poisoned before each run. On the GPU, triton_aot.py compiles its kernels for
sm_90/sm_80 and bench/gpu_check.py runs them."""
import itertools

import pytest
import torch

from fvkernels import fv_accumulate
from fvkernels.ops import dispatch, triton_fv
from fvkernels.ops.kernel_args import FVAccumulateArgs
from fvkernels.ops.reference import fv_accumulate_backward

from tests.helpers import random_problem, relative_error

pytestmark = pytest.mark.skipif(dispatch.unavailable_reason("triton", torch.device("cpu")) is not None,
                                reason="the Triton backend does not run on CPU tensors here (TRITON_INTERPRET=1)")

GRAD_NAMES = ("z", "x", "dec_weight", "dec_bias", "inv_sigma2", "x_scale")
SHAPES = [(1, 1, 1, 1), (3, 7, 17, 5), (2, 33, 18, 40), (5, 20, 40, 16), (2, 0, 6, 4), (2, 9, 5, 70)]


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every floating buffer torch.empty / empty_like allocates starts as NaN: an element no program writes shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def problem(shape, channel_major, scaled, fisher):
    num_sets, set_size, channels, latent = shape
    z, x, w, b, s, f, lengths = random_problem(num_sets, set_size, channels, latent, fisher=fisher)
    if channel_major:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    x_scale = torch.rand(num_sets, set_size, dtype=torch.float64) + 0.5 if scaled else None
    return torch.randn(num_sets, channels, latent + 1, dtype=torch.float64), z, x, w, b, s, f, lengths, x_scale


def compare(inputs, needs):
    grad_out, z, x, w, b, s, f, lengths, x_scale = inputs
    wide = fv_accumulate_backward(grad_out, z, x, w, b, s, f, lengths, x_scale, (*needs[:5], False, needs[5]))
    expected = [*wide[:5], wide[6]]
    low = [None if t is None or not t.is_floating_point() else t.float() for t in inputs]
    low[7] = lengths
    grad_low, *rest = low
    got = triton_fv.backward(FVAccumulateArgs(*rest[:7], grad_low, rest[7]), grad_low, needs)
    for name, actual, want, need in zip(GRAD_NAMES, got, expected, needs):
        if not need:
            assert actual is None, name
            continue
        assert actual.shape == want.shape and not actual.isnan().any(), f"grad_{name} has unwritten elements"
        if want.numel():
            assert relative_error(actual, want) <= 2e-5, name


@pytest.mark.usefixtures("poisoned_buffers")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channel_major,scaled,fisher", [(False, False, False), (True, True, True)])
def test_every_gradient_matches_the_reference(shape, channel_major, scaled, fisher):
    compare(problem(shape, channel_major, scaled, fisher), (True,) * 5 + (scaled,))


@pytest.mark.usefixtures("poisoned_buffers")
@pytest.mark.parametrize("needs", [needs for needs in itertools.product([False, True], repeat=6) if sum(needs) == 1])
def test_only_the_gradients_asked_for_are_computed(needs):
    compare(problem((3, 20, 21, 9), False, True, True), needs)


def test_the_op_backward_goes_to_the_triton_kernels(monkeypatch):
    calls = []
    launch = dispatch.launch_backward
    monkeypatch.setattr(dispatch, "launch_backward", lambda *args: calls.append(args[0]) or launch(*args))
    z, x, w, b, s, f, lengths = [t.float().requires_grad_() if t is not None and t.is_floating_point() else t
                                 for t in random_problem(3, 9, 6, 4)]
    fv_accumulate(z, x, w, b, s, f, lengths, backend="triton").sum().backward()
    assert calls == ["triton"] and dispatch.has_fused_backward("triton")
