"""The bfloat16 CPU forward (csrc/cpu/fv_accumulate_bf16_kernel.h, AVX512-BF16) against the float64 reference
on the bf16-rounded inputs, judged against torch's own bfloat16 composite error there (flash-attention's rule):
odd shapes around its panel sizes (32 columns, row pairs, 12 rows), odd T and d, ragged and empty sets,
channel-major x, every epilogue option; outputs poisoned before each run."""
import pytest
import torch

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
