"""The fused CPU backward (csrc/cpu/fv_accumulate_backward_kernel.h) against the float64 reference backward.

Odd shapes around the kernel's panel and block sizes, ragged and empty sets, channel-major x, every option and
every subset of gradients asked for, every instruction-set build this CPU can run, gradients poisoned before
each run; the op fvkernels::fv_accumulate_backward by opcheck; the double backward through the reference.
"""
import itertools

import pytest
import torch

import fvkernels
from fvkernels.ops import _extension, cpp, dispatch
from fvkernels.ops.fv_accumulate import fv_accumulate_backward_op
from fvkernels.ops.kernel_args import FVAccumulateArgs
from fvkernels.ops.reference import fv_accumulate_backward

from tests.helpers import random_problem, relative_error

pytestmark = pytest.mark.skipif(_extension.IMPORT_ERROR is not None,
                                reason=f"the C++ extension is not built ({_extension.IMPORT_ERROR})")


def cpp_bf16_kernel() -> bool:
    return _extension.IMPORT_ERROR is None and _extension.extension().cpu_bf16_kernel_available()

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12}
GRAD_NAMES = ("z", "x", "dec_weight", "dec_bias", "inv_sigma2", "x_scale")
# Around the panel widths (16/32 columns), the microkernel rows (6/12) and the row blocks (up to 128 rows).
SHAPES = [(1, 1, 1, 1), (3, 7, 17, 5), (2, 13, 33, 16), (4, 50, 70, 33), (2, 130, 19, 7), (1, 300, 40, 12),
          (3, 5, 9, 0), (2, 0, 6, 4)]


def problem_with_options(shape, dtype, channel_major, scaled, fisher):
    num_sets, set_size, channels, latent = shape
    z, x, w, b, s, f, lengths = random_problem(num_sets, set_size, channels, latent, fisher=fisher)
    if channel_major:  # the (N, T, C) view of NCHW maps, as the pipeline hands them over
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    x_scale = torch.rand(num_sets, set_size, dtype=torch.float64) + 0.5 if scaled else None
    grad_out = torch.randn(num_sets, channels, latent + 1, dtype=torch.float64)
    return [t if t is None or not t.is_floating_point() else t.to(dtype)
            for t in (grad_out, z, x, w, b, s, f, lengths, x_scale)]


def fused_gradients(grad_out, z, x, w, b, s, f, lengths, x_scale, needs):
    args = FVAccumulateArgs(z, x, w, b, s, f, lengths, grad_out.contiguous(), x_scale)
    return cpp.backward(args, grad_out, needs)


def expected_gradients(grad_out, z, x, w, b, s, f, lengths, x_scale, needs):
    wide = [t if t is None or not t.is_floating_point() else t.double() for t in (grad_out, z, x, w, b, s, f, x_scale)]
    grad_out, z, x, w, b, s, f, x_scale = wide
    grads = fv_accumulate_backward(grad_out, z, x, w, b, s, f, lengths, x_scale, (*needs[:5], False, needs[5]))
    return [*grads[:5], grads[6]]


def assert_match(actual, expected, dtype, needs):
    for name, got, want, need in zip(GRAD_NAMES, actual, expected, needs):
        if not need:
            assert got is None, name
            continue
        assert got.dtype == dtype and got.shape == want.shape, name
        assert not got.isnan().any(), f"grad_{name} has unwritten elements"
        if want.numel():
            assert relative_error(got, want) <= TOLERANCE[dtype], name


@pytest.mark.usefixtures("poisoned_gradients")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_gradient_matches_the_reference(isa, dtype, shape):
    for channel_major, scaled, fisher in [(False, False, False), (True, True, True), (False, True, True)]:
        problem = problem_with_options(shape, dtype, channel_major, scaled, fisher)
        needs = (True,) * 5 + (scaled,)
        assert_match(fused_gradients(*problem, needs), expected_gradients(*problem, needs), dtype, needs)


@pytest.mark.usefixtures("poisoned_gradients")
@pytest.mark.parametrize("needs", [needs for needs in itertools.product([False, True], repeat=6) if sum(needs) == 1]
                         + [(True, False, True, False, False, False), (False, True, False, True, True, True)])
def test_only_the_gradients_asked_for_are_computed(needs):
    problem = problem_with_options((3, 20, 21, 9), torch.float64, False, True, True)
    assert_match(fused_gradients(*problem, needs), expected_gradients(*problem, needs), torch.float64, needs)


def test_results_are_deterministic_for_a_thread_count_and_close_across_counts():
    problem = problem_with_options((5, 70, 40, 20), torch.float32, False, True, True)
    needs = (True,) * 6
    previous = torch.get_num_threads()
    try:
        runs = {}
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            runs.setdefault(threads, []).append(fused_gradients(*problem, needs))
    finally:
        torch.set_num_threads(previous)
    for first, second in zip(*runs[1]):
        assert torch.equal(first, second)
    if 2 in runs:
        for one, two in zip(runs[1][0], runs[2][0]):
            assert relative_error(two, one) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16] + ([] if cpp_bf16_kernel() else [torch.bfloat16]))
def test_half_inputs_without_a_kernel_of_their_own_are_computed_in_float32(dtype):
    """float16 always, bfloat16 on CPUs without AVX512-BF16 (tests/test_cpu_bf16.py tests its own backward)."""
    problem = problem_with_options((3, 11, 18, 6), torch.float32, False, True, True)
    needs = (True,) * 6
    half = [t if t is None or not t.is_floating_point() else t.to(dtype) for t in problem]
    widened = [t if t is None or not t.is_floating_point() else t.float() for t in half]
    for got, want in zip(fused_gradients(*half, needs), fused_gradients(*widened, needs)):
        assert got.dtype == dtype and torch.equal(got, want.to(dtype))


@pytest.mark.parametrize("scaled", [False, True])
def test_opcheck_of_the_backward_op(scaled):
    grad_out, z, x, w, b, s, f, lengths, x_scale = problem_with_options((3, 7, 5, 3), torch.float64, False, scaled,
                                                                        True)
    needs = [True, False, True, True, True, scaled]
    torch.library.opcheck(fv_accumulate_backward_op, [grad_out, z, x, w, b, s, f, lengths, x_scale, needs, "cpp"])


def test_the_op_backward_goes_to_the_fused_kernel(monkeypatch):
    calls = []
    launch = dispatch.launch_backward
    monkeypatch.setattr(dispatch, "launch_backward", lambda *args: calls.append(args[0]) or launch(*args))
    z, x, w, b, s, f, lengths = [t.requires_grad_() if t is not None and t.is_floating_point() else t
                                 for t in random_problem(3, 9, 6, 4)]
    out = fvkernels.fv_accumulate(z, x, w, b, s, f, lengths, backend="cpp")
    out.sum().backward()
    assert calls == ["cpp"]
    assert dispatch.has_fused_backward("cpp") and not dispatch.has_fused_backward("torch")


def test_double_backward_goes_through_the_reference():
    z, x, w, b, s, f, lengths = random_problem(2, 6, 4, 3)
    inputs = [t.clone().requires_grad_() for t in (z, x, w, b, s)]
    assert torch.autograd.gradgradcheck(lambda *a: fvkernels.fv_accumulate(*a, f, lengths, backend="cpp"), inputs)


@pytest.mark.parametrize("shape", [(0, 5, 7, 3), (2, 5, 0, 3)])
def test_no_sets_or_no_channels_give_zero_gradients(shape):
    num_sets, set_size, channels, latent = shape
    z, x, w, b, s, f, _ = random_problem(num_sets, set_size, channels, latent, ragged=False)
    grad_out = torch.randn(num_sets, channels, latent + 1, dtype=torch.float64)
    x_scale = torch.rand(num_sets, set_size, dtype=torch.float64) + 0.5
    grads = fv_accumulate_backward_op(grad_out, z, x, w, b, s, f, None, x_scale, [True] * 6, "cpp")
    for grad in grads:
        assert (grad == 0).all()
    assert grads[2].shape == (channels, latent) and grads[0].shape == z.shape
    with pytest.raises(ValueError, match="needs must say for each of z, x, dec_weight, dec_bias, inv_sigma2, x_scale"):
        fv_accumulate_backward_op(grad_out, z, x, w, b, s, f, None, x_scale, [True] * 5, "cpp")


def test_a_thread_team_smaller_than_asked_for_gives_the_same_gradients():
    """OpenMP may grant fewer threads than torch.set_num_threads asks (OMP_THREAD_LIMIT, OMP_DYNAMIC, nesting): the
    parameter gradients are summed over the threads that ran, not over the ones asked for."""
    import os
    import subprocess
    import sys
    script = (
        "import torch, sys\n"
        "sys.path.insert(0, '.')\n"
        "from tests.helpers import random_problem, relative_error\n"
        "from fvkernels.ops import cpp\n"
        "from fvkernels.ops.kernel_args import FVAccumulateArgs\n"
        "from fvkernels.ops.reference import fv_accumulate_backward\n"
        "torch.manual_seed(0)\n"
        "torch.set_num_threads(4)\n"
        "z, x, w, b, s, f, l = random_problem(5, 40, 30, 9)\n"
        "g = torch.randn(5, 30, 10, dtype=torch.float64)\n"
        "got = cpp.backward(FVAccumulateArgs(z, x, w, b, s, f, l, g), g, (True,) * 5 + (False,))\n"
        "want = fv_accumulate_backward(g, z, x, w, b, s, f, l, None, (True,) * 5 + (False, False))\n"
        "print(max(relative_error(a, e) for a, e in zip(got[:5], want[:5])))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for limit in ({"OMP_THREAD_LIMIT": "1"}, {"OMP_DYNAMIC": "true"}):
        run = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, **limit))
        assert run.returncode == 0, run.stderr[-2000:]
        assert float(run.stdout.strip().splitlines()[-1]) <= 1e-12, (limit, run.stdout)
