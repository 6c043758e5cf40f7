"""The fused CPU kernel (csrc/cpu) against the float64 reference, through its launcher fvkernels.ops.cpp.

Odd shapes around the kernel's panel sizes, ragged and empty sets, strided inputs, every epilogue option,
and every instruction-set build this CPU can run (FVK_CPU_ISA).
"""

import pytest
import torch

from fvkernels.common.tensors import signed_sqrt as signed_sqrt_of
from fvkernels.ops import _extension, cpp, reference
from fvkernels.ops.kernel_args import FVAccumulateArgs

from tests.helpers import poisoned_output, random_problem, relative_error, runnable_isas

pytestmark = pytest.mark.skipif(_extension.IMPORT_ERROR is not None,
                                reason=f"the C++ extension is not built ({_extension.IMPORT_ERROR})")

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
# Shapes around the panel sizes (16/32 columns, 6/12 rows); the largest are left to test_long_sets.
SHAPES = [(channels, latent, set_size) for channels in (1, 3, 17, 512) for latent in (1, 7, 16, 256, 300)
          for set_size in (0, 1, 5, 50, 130) if channels * latent * set_size <= 512 * 256 * 50]


def expected_output(z, x, w, b, s, f, lengths, x_scale=None, signed_sqrt=False):
    fv = reference.fv_accumulate_reference(z, x, w, b, s, f, lengths, x_scale)
    return signed_sqrt_of(fv) if signed_sqrt else fv


def run_kernel(dtype, z, x, w, b, s, f, lengths, *, x_scale=None, signed_sqrt=False, row_sumsq=False,
               set_padding=0, num_threads=None):
    cast = [None if t is None else t.to(dtype) for t in (z, x, w, b, s, f, x_scale)]
    out = poisoned_output(z.shape[0], x.shape[2], z.shape[2], dtype, set_padding)
    sums = torch.full((z.shape[0], x.shape[2]), float("nan")) if row_sumsq else None
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        cpp.launch(FVAccumulateArgs(*cast[:6], lengths, out, x_scale=cast[6], signed_sqrt=signed_sqrt, row_sumsq=sums))
    finally:
        torch.set_num_threads(previous_threads)
    return out, sums


def assert_matches(out, expected, dtype):
    assert not out.isnan().any(), "the kernel left entries unwritten"
    if expected.numel() and expected.abs().max() > 0:
        assert relative_error(out, expected) <= TOLERANCE[dtype]
    else:
        assert (out == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels, latent, set_size", SHAPES)
def test_shapes(dtype, channels, latent, set_size):
    problem = random_problem(3, set_size, channels, latent)
    out, _ = run_kernel(dtype, *problem, set_padding=5)
    assert_matches(out, expected_output(*problem), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fisher", [False, True])
@pytest.mark.parametrize("channels, latent, set_size", [(1, 1, 1), (17, 7, 5), (40, 37, 50), (100, 300, 13)])
def test_isa_builds(isa, dtype, fisher, channels, latent, set_size):
    """Every build has its own panel sizes; shapes with remainders in rows, columns and channels."""
    problem = random_problem(3, set_size, channels, latent, fisher=fisher)
    out, _ = run_kernel(dtype, *problem, set_padding=5)
    assert_matches(out, expected_output(*problem), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("set_size, channels, latent", [(130, 512, 256), (784, 64, 256), (784, 17, 300)])
def test_long_sets(dtype, set_size, channels, latent):
    """Several row blocks per set (partial G carried between blocks), ragged lengths across block edges."""
    problem = random_problem(4, set_size, channels, latent)
    problem[6][2:] = torch.tensor([set_size - 1, 129])
    out, _ = run_kernel(dtype, *problem)
    assert_matches(out, expected_output(*problem), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed_sqrt", [False, True])
@pytest.mark.parametrize("fisher", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_options(isa, dtype, signed_sqrt, fisher, scaled):
    """x_scale, fisher_rsqrt, signed sqrt and row sums of squares on NCHW-strided x and strided z, W."""
    num_sets, set_size, channels, latent = 5, 50, 40, 37
    z, _, w, b, s, f, lengths = random_problem(num_sets, set_size, channels, latent, fisher=fisher)
    maps = torch.rand(num_sets, channels, set_size, dtype=torch.float64)
    x = maps.transpose(1, 2)  # the (N, T, C) view of channel-major maps, as a CNN gives them
    z = torch.randn(num_sets, latent, set_size, dtype=torch.float64).transpose(1, 2)
    w = torch.randn(latent, channels, dtype=torch.float64).t() / latent ** 0.5
    x_scale = torch.rand(set_size, num_sets, dtype=torch.float64).t() + 0.5 if scaled else None
    expected = expected_output(z, x, w, b, s, f, lengths, x_scale, signed_sqrt)
    out, sums = run_kernel(dtype, z, x, w, b, s, f, lengths, x_scale=x_scale, signed_sqrt=signed_sqrt,
                           row_sumsq=True, set_padding=3)
    tolerance = TOLERANCE[dtype]
    if signed_sqrt and dtype == torch.float32:
        # sqrt turns an absolute error e near zero into sqrt(e): judge against torch's own float32 error.
        inputs = [None if t is None else t.float() for t in (z, x, w, b, s, f, lengths, x_scale)]
        inputs[6] = lengths
        tolerance = max(tolerance, 2 * relative_error(expected_output(*inputs, signed_sqrt=True), expected))
    assert not out.isnan().any()
    assert relative_error(out, expected) <= tolerance
    assert relative_error(sums, expected.square().sum(-1)) <= 1e-5
    assert (out[1] == 0).all() and (sums[1] == 0).all(), "an empty set must give exactly zero"


@pytest.mark.parametrize("num_sets, set_size", [(0, 5), (3, 0), (1, 7)])
def test_degenerate_sizes(num_sets, set_size):
    problem = random_problem(num_sets, set_size, 17, 7, ragged=False)
    out, sums = run_kernel(torch.float32, *problem, row_sumsq=True)
    assert_matches(out, expected_output(*problem), torch.float32)
    if set_size == 0:
        assert (sums == 0).all()


def test_independent_of_thread_count():
    problem = random_problem(3, 130, 100, 40)
    one, _ = run_kernel(torch.float32, *problem, num_threads=1)
    two, _ = run_kernel(torch.float32, *problem, num_threads=2)
    three, _ = run_kernel(torch.float32, *problem, num_threads=3)
    assert torch.equal(one, two) and torch.equal(one, three)


@pytest.mark.parametrize("dtype,isa_name", [(torch.float16, None), (torch.bfloat16, "avx2")])
def test_half_dtypes_the_kernel_has_no_build_for_are_refused(dtype, isa_name, monkeypatch):
    """float16 always; bfloat16 where the bfloat16 kernels cannot run (here: the ISA limited to AVX2); forward and
    backward alike."""
    if isa_name is not None:
        monkeypatch.setenv("FVK_CPU_ISA", isa_name)
        if isa_name not in runnable_isas():
            pytest.skip(f"this CPU has no {isa_name}")
    problem = random_problem(2, 5, 3, 4, dtype=torch.float32)
    out = torch.empty(2, 3, 5, dtype=dtype)
    struct = _extension.kernel_struct(FVAccumulateArgs(
        *[t.to(dtype) if t.is_floating_point() else t for t in problem[:6]], problem[6], out))
    refusal = "dtype must be float32 or float64, or bfloat16 on a CPU with AVX512-BF16"
    with pytest.raises(ValueError, match=refusal):
        _extension.extension().fv_accumulate_cpu(struct, 1)
    grad_out = torch.zeros(2, 3, 5, dtype=dtype)
    backward, _ = _extension.backward_struct(FVAccumulateArgs(
        *[t.to(dtype) if t.is_floating_point() else t for t in problem[:6]], problem[6], grad_out), grad_out,
        (True,) * 6)
    with pytest.raises(ValueError, match=refusal):
        _extension.extension().fv_accumulate_backward_cpu(backward, 1)


def test_half_inputs_are_widened_by_the_launcher():
    problem = random_problem(2, 9, 5, 4)
    out, _ = run_kernel(torch.bfloat16, *problem)
    rounded = [None if t is None or not t.is_floating_point() else t.bfloat16().double() for t in problem]
    rounded[6] = problem[6]
    assert relative_error(out, expected_output(*rounded)) <= 1e-2


@pytest.mark.parametrize("huge_pages", ["1", "0"])
def test_a_large_fresh_output_is_written_whole_with_or_without_huge_pages(huge_pages, monkeypatch):
    """Outputs of 4 MiB and more get the huge-page advice (FVK_HUGE_PAGES=0 withholds it) before the kernel first
    touches them: every entry written, the same values either way. An odd byte offset keeps the advised range
    strictly inside the buffer."""
    monkeypatch.setenv("FVK_HUGE_PAGES", huge_pages)
    z, x, w, b, s, f, lengths = random_problem(40, 9, 160, 191, dtype=torch.float32)
    storage = torch.empty(40 * 160 * 192 + 3)  # fresh: no page touched before the kernel
    out = storage[3:].view(40, 160, 192)
    cpp.launch(FVAccumulateArgs(z, x, w, b, s, f, lengths, out))
    assert out.numel() * out.element_size() >= 4 << 20
    assert relative_error(out, expected_output(z.double(), x.double(), w.double(), b.double(), s.double(),
                                               f.double(), lengths)) <= 1e-5
