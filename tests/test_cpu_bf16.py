"""The bfloat16 CPU forward and backward (csrc/cpu/fv_accumulate_bf16_kernel.h and
fv_accumulate_bf16_backward_kernel.h, AVX512-BF16) against the float64 reference on the bf16-rounded inputs,
judged against torch's own bfloat16 composite error there (flash-attention's rule): odd shapes around the panel
sizes (32 columns, row pairs, 12 rows), odd T and d, ragged and empty sets, channel-major x, every epilogue option,
every subset of gradients; outputs poisoned before each run."""
import pytest
import torch

import fvkernels
from fvkernels.common.tensors import signed_sqrt as signed_sqrt_of
from fvkernels.ops import _extension, cpp, reference
from fvkernels.ops.kernel_args import FVAccumulateArgs

from tests.helpers import poisoned_output, random_problem, relative_error

pytestmark = pytest.mark.skipif(_extension.IMPORT_ERROR is not None or not _extension.extension()
                                .cpu_bf16_kernel_available(), reason="no bfloat16 CPU kernel on this machine")

SHAPES = [(1, 1, 1), (3, 7, 17), (31, 33, 5), (32, 32, 50), (40, 37, 129), (100, 300, 13), (512, 256, 130)]
# Added to twice torch's own error: both sides round R to bfloat16 once, in other orders.
ATOL = 2e-3


def measure(out, signed_sqrt):
    """sign(v)·v² after a signed square root, where an error ε near 0 would read as √ε."""
    return out * out.abs() if signed_sqrt else out


def run(problem, x_scale=None, signed_sqrt=False, with_row_sumsq=False, channel_major=False, num_threads=None):
    z, x, w, b, s, f, lengths = [t.bfloat16() if t is not None and t.is_floating_point() else t for t in problem]
    if channel_major:  # the (N, T, C) view of NCHW maps
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    scale = None if x_scale is None else x_scale.bfloat16()
    out = poisoned_output(z.shape[0], x.shape[2], z.shape[2], torch.bfloat16, set_padding=3)
    sums = torch.full((z.shape[0], x.shape[2]), float("nan")) if with_row_sumsq else None
    previous = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        cpp.launch(FVAccumulateArgs(z, x, w, b, s, f, lengths, out, scale, signed_sqrt, sums))
    finally:
        torch.set_num_threads(previous)
    assert not out.isnan().any(), "the kernel left entries unwritten"
    rounded = [t.double() if t is not None and t.is_floating_point() else t for t in (z, x, w, b, s, f, lengths)]
    expected = reference.fv_accumulate_reference(*rounded, None if scale is None else scale.double())
    composite = reference.fv_accumulate_reference(z, x, w, b, s, f, lengths, scale)
    if signed_sqrt:
        expected, composite = signed_sqrt_of(expected), signed_sqrt_of(composite)
    return out, sums, expected, composite


@pytest.mark.parametrize("channels, latent, set_size", SHAPES)
@pytest.mark.parametrize("fisher", [False, True])
def test_shapes_against_float64(channels, latent, set_size, fisher):
    out, _, expected, composite = run(random_problem(3, set_size, channels, latent, fisher=fisher))
    assert out.dtype == torch.bfloat16
    if expected.abs().max() == 0:
        assert (out == 0).all()
        return
    assert relative_error(out, expected) <= 2 * relative_error(composite, expected) + ATOL


@pytest.mark.parametrize("channel_major", [False, True])
@pytest.mark.parametrize("signed_sqrt", [False, True])
def test_epilogue_options(channel_major, signed_sqrt):
    problem = random_problem(5, 51, 40, 37)
    x_scale = torch.rand(5, 51, dtype=torch.float64) + 0.5
    out, sums, expected, composite = run(problem, x_scale, signed_sqrt, True, channel_major)
    error = relative_error(measure(out, signed_sqrt), measure(expected, signed_sqrt))
    assert error <= 2 * relative_error(measure(composite, signed_sqrt), measure(expected, signed_sqrt)) + ATOL
    assert relative_error(sums, out.float().square().sum(-1)) <= 1e-5  # the sums of the stored values


def test_empty_sets_and_sets_without_descriptors():
    z, x, w, b, s, f, lengths = random_problem(4, 9, 6, 5)
    lengths = torch.tensor([9, 0, 4, 0])
    out, _, expected, _ = run((z, x, w, b, s, f, lengths))
    assert (out[1] == 0).all() and (out[3] == 0).all()
    assert relative_error(out, expected) <= 2e-2


def test_independent_of_thread_count():
    problem = random_problem(3, 130, 100, 40)
    one, *_ = run(problem, num_threads=1)
    two, *_ = run(problem, num_threads=2)
    assert torch.equal(one, two)


# ---- the backward (csrc/cpu/fv_accumulate_bf16_backward_kernel.h) ----------------------------------------------

GRAD_NAMES = ("z", "x", "dec_weight", "dec_bias", "inv_sigma2", "x_scale")
BACKWARD_SHAPES = [(1, 1, 1, 1), (3, 7, 17, 5), (2, 13, 33, 16), (4, 50, 70, 33), (2, 130, 19, 7), (1, 300, 40, 12),
                   (2, 51, 100, 129)]


def backward_problem(shape, channel_major=False, scaled=True, fisher=True, ragged=True):
    """(grad_out, z, x, w, b, s, f, lengths, x_scale) in bfloat16 (lengths int64)."""
    num_sets, set_size, channels, latent = shape
    z, x, w, b, s, f, lengths = random_problem(num_sets, set_size, channels, latent, fisher=fisher, ragged=ragged)
    if channel_major:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    x_scale = torch.rand(num_sets, set_size, dtype=torch.float64) + 0.5 if scaled else None
    grad_out = torch.randn(num_sets, channels, latent + 1, dtype=torch.float64)
    return [t if t is None or not t.is_floating_point() else t.bfloat16()
            for t in (grad_out, z, x, w, b, s, f, lengths, x_scale)]


def backward_of(grad_out, z, x, w, b, s, f, lengths, x_scale, needs):
    return cpp.backward(FVAccumulateArgs(z, x, w, b, s, f, lengths, grad_out.contiguous(), x_scale), grad_out, needs)


def reference_backward(grad_out, z, x, w, b, s, f, lengths, x_scale, needs):
    """The reference backward on these tensors, in their own dtype (bfloat16: torch's composite) or widened."""
    grads = reference.fv_accumulate_backward(grad_out, z, x, w, b, s, f, lengths, x_scale,
                                             (*needs[:5], False, needs[5]))
    return [*grads[:5], grads[6]]


def assert_backward_matches(problem, needs):
    got = backward_of(*problem, needs)
    wide = [t if t is None or not t.is_floating_point() else t.double() for t in problem]
    expected = reference_backward(*wide, needs)
    composite = reference_backward(*problem, needs)
    for name, grad, want, torch_own, need in zip(GRAD_NAMES, got, expected, composite, needs):
        if not need or want is None:
            assert grad is None, name
            continue
        assert grad.dtype == torch.bfloat16 and grad.shape == want.shape, name
        assert not grad.isnan().any(), f"grad_{name} has unwritten elements"
        if want.numel() == 0:
            continue
        if want.abs().max() == 0:
            assert (grad == 0).all(), name
            continue
        error, allowed = relative_error(grad, want), 2 * relative_error(torch_own, want) + ATOL
        assert error <= allowed, f"grad_{name}: {error:.2e} > {allowed:.2e}"


@pytest.mark.usefixtures("poisoned_gradients")
@pytest.mark.parametrize("shape", BACKWARD_SHAPES)
@pytest.mark.parametrize("channel_major, scaled, fisher", [(False, False, False), (True, True, True),
                                                             (False, True, True)])
def test_backward_against_float64(shape, channel_major, scaled, fisher):
    needs = (True,) * 5 + (scaled,)
    assert_backward_matches(backward_problem(shape, channel_major, scaled, fisher), needs)


@pytest.mark.usefixtures("poisoned_gradients")
@pytest.mark.parametrize("needs", [tuple(i == j for j in range(6)) for i in range(6)]
                         + [(True, False, True, False, False, False), (False, True, False, True, True, True)])
def test_backward_computes_only_the_gradients_asked_for(needs):
    assert_backward_matches(backward_problem((3, 20, 37, 9)), needs)


@pytest.mark.usefixtures("poisoned_gradients")
def test_backward_of_empty_sets_and_rows_past_a_length_is_zero():
    problem = backward_problem((4, 9, 6, 5), ragged=False)
    problem[7] = torch.tensor([9, 0, 4, 0])
    grads = backward_of(*problem, (True,) * 6)
    for grad in (grads[0], grads[1], grads[5]):  # z, x and x_scale, per descriptor
        assert (grad[1] == 0).all() and (grad[3] == 0).all() and (grad[2, 4:] == 0).all()
    assert_backward_matches(problem, (True,) * 6)


@pytest.mark.parametrize("shape", [(0, 5, 7, 3), (2, 5, 0, 3), (2, 0, 6, 4)])
def test_backward_without_sets_channels_or_descriptors_is_zero(shape):
    grads = backward_of(*backward_problem(shape, ragged=False), (True,) * 6)
    for grad in grads:
        assert grad.dtype == torch.bfloat16 and (grad == 0).all()


def test_backward_is_deterministic_for_a_thread_count():
    problem = backward_problem((5, 70, 40, 20))
    runs = {}
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            runs.setdefault(threads, []).append(backward_of(*problem, (True,) * 6))
    finally:
        torch.set_num_threads(previous)
    for repeats in runs.values():
        for first, second in zip(*repeats):
            assert torch.equal(first, second)


def test_training_through_the_op_uses_the_bfloat16_backward(monkeypatch):
    """Autograd of fvkernels.fv_accumulate on bfloat16 leaves reaches this kernel (not the float32 one)."""
    calls = []
    launch = cpp.backward
    monkeypatch.setattr(cpp, "backward", lambda args, *rest: calls.append(args.z.dtype) or launch(args, *rest))
    z, x, w, b, s, f, lengths = [t.bfloat16().requires_grad_() if t is not None and t.is_floating_point() else t
                                 for t in random_problem(3, 30, 40, 12)]
    grad_out = torch.randn(3, 40, 13).bfloat16()
    fvkernels.fv_accumulate(z, x, w, b, s, f, lengths, backend="cpp").backward(grad_out)
    assert calls == [torch.bfloat16]
    problem = [grad_out, z.detach(), x.detach(), w.detach(), b.detach(), s.detach(), f.detach(), lengths, None]
    wide = [t if t is None or not t.is_floating_point() else t.double() for t in problem]
    expected = reference_backward(*wide, (True,) * 5 + (False,))
    composite = reference_backward(*problem, (True,) * 5 + (False,))
    for leaf, want, torch_own in zip((z, x, w, b, s), expected, composite):
        assert leaf.grad.dtype == torch.bfloat16
        assert relative_error(leaf.grad, want) <= 2 * relative_error(torch_own, want) + ATOL
