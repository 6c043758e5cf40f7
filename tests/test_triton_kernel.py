"""The Triton kernel (fvkernels/ops/triton_fv.py) against the float64 reference, through its launcher.

On CPU tensors this runs under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before
triton is imported); without the interpreter it runs on a CUDA device when there is one. Shapes are
small and odd on purpose: channel blocks, T-blocks and d-tiles all end in a partial tile.
"""
import pytest
import torch

from fvkernels.ops import dispatch, reference
from fvkernels.ops.kernel_args import FVAccumulateArgs

from tests.helpers import poisoned_output, random_problem, relative_error

triton_fv = pytest.importorskip("fvkernels.ops.triton_fv", reason="triton is not installed")

if dispatch.triton_interpreted():
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip("the Triton kernel needs a CUDA device or the interpreter: TRITON_INTERPRET=1 must be set "
                "before triton is imported (tests/conftest.py does this)", allow_module_level=True)

# Interpreted, output tiles are at most 64 wide: d = 70 spans two d-tiles (P's reduction streamed in K chunks).
TILED_LATENT = 70
FP32_TOLERANCE = 1e-5


def make_problem(num_sets, set_size, channels, latent):
    return random_problem(num_sets, set_size, channels, latent, device=DEVICE)


def run_kernel(problem, dtype, *, x_scale=None, signed_sqrt=False, with_row_sumsq=False, t_splits=None,
               with_fisher=True, with_lengths=True):
    """Casts the float64 problem to dtype, launches the kernel; returns (out, row_sumsq or None)."""
    z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths = problem
    floats = [t.to(dtype) for t in (z, x, dec_weight, dec_bias, inv_sigma2)]
    num_sets, _, latent = z.shape
    channels = x.shape[2]
    out = poisoned_output(num_sets, channels, latent, dtype, set_padding=3, device=DEVICE)
    row_sumsq = (torch.full((num_sets, channels), float("nan"), device=DEVICE) if with_row_sumsq else None)
    triton_fv.launch(FVAccumulateArgs(*floats, fisher_rsqrt.to(dtype) if with_fisher else None,
                                      lengths if with_lengths else None, out,
                                      x_scale=None if x_scale is None else x_scale.to(dtype), signed_sqrt=signed_sqrt,
                                      row_sumsq=row_sumsq), t_splits=t_splits)
    return out, row_sumsq


def expected_fv(problem, *, x_scale=None, with_fisher=True, with_lengths=True):
    z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths = problem
    return reference.fv_accumulate_reference(z, x, dec_weight, dec_bias, inv_sigma2,
                                             fisher_rsqrt if with_fisher else None,
                                             lengths if with_lengths else None, x_scale)


def undo_signed_sqrt(out):
    """sign(v)·v²: compares signed-sqrt outputs on the scale of v, where fp32 error is uniform (the
    square root's slope near 0 would magnify rounding of tiny entries far beyond the fp32 contract)."""
    out = out.double()
    return out.sign() * out.square()


@pytest.mark.parametrize("channels", [3, 17])
@pytest.mark.parametrize("latent", [1, 7, 20])
@pytest.mark.parametrize("set_size", [1, 5, 50, 130])
def test_fp32_matches_float64_reference(channels, latent, set_size):
    problem = make_problem(3, set_size, channels, latent)
    out, _ = run_kernel(problem, torch.float32)
    assert not out.isnan().any(), "the kernel left output entries unwritten"
    assert relative_error(out, expected_fv(problem)) <= FP32_TOLERANCE


@pytest.mark.parametrize("latent", [7, TILED_LATENT])
@pytest.mark.parametrize("signed_sqrt", [False, True])
@pytest.mark.parametrize("t_splits", [1, 3])
def test_epilogue_options(latent, signed_sqrt, t_splits):
    """x_scale on a channel-major (NCHW-like) x, signed sqrt and row sums of squares, on the direct
    path (t_splits=1; d-tiled, the row sums come from a read of out) and through the split workspace."""
    num_sets, set_size, channels = 3, 37, 17
    problem = list(make_problem(num_sets, set_size, channels, latent))
    maps = torch.rand(num_sets, channels, set_size, dtype=torch.float64, device=DEVICE)
    problem[1] = maps.transpose(1, 2)  # x as an (N, T, C) view: stride_t = 1, stride_c = T
    x_scale = torch.rand(num_sets, set_size, dtype=torch.float64, device=DEVICE) + 0.5
    expected = expected_fv(problem, x_scale=x_scale)
    out, row_sumsq = run_kernel(problem, torch.float32, x_scale=x_scale, signed_sqrt=signed_sqrt,
                                with_row_sumsq=True, t_splits=t_splits)
    assert not out.isnan().any() and not row_sumsq.isnan().any()
    if signed_sqrt:
        assert relative_error(undo_signed_sqrt(out), expected) <= FP32_TOLERANCE
        assert relative_error(row_sumsq, expected.abs().sum(-1)) <= FP32_TOLERANCE
    else:
        assert relative_error(out, expected) <= FP32_TOLERANCE
        assert relative_error(row_sumsq, expected.square().sum(-1)) <= FP32_TOLERANCE
    # one writer per row: row_sumsq is exactly the sum of squares of what was stored
    torch.testing.assert_close(row_sumsq, out.float().square().sum(-1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("latent", [7, TILED_LATENT])
@pytest.mark.parametrize("t_splits", [2, 5])
def test_split_t_is_deterministic(latent, t_splits):
    """Forced T-splits, more of them than some sets have T-blocks: the same result as the reference and
    bit-identical across runs (fixed-order reduction, no atomics)."""
    problem = make_problem(3, 70, 17, latent)
    out, _ = run_kernel(problem, torch.float32, t_splits=t_splits)
    again, _ = run_kernel(problem, torch.float32, t_splits=t_splits)
    assert not out.isnan().any()
    assert relative_error(out, expected_fv(problem)) <= FP32_TOLERANCE
    assert torch.equal(out, again)


@pytest.mark.parametrize("with_fisher, with_lengths", [(False, False), (False, True), (True, False)])
def test_optional_inputs_absent(with_fisher, with_lengths):
    problem = make_problem(2, 21, 17, 7)
    out, _ = run_kernel(problem, torch.float32, with_fisher=with_fisher, with_lengths=with_lengths)
    expected = expected_fv(problem, with_fisher=with_fisher, with_lengths=with_lengths)
    assert relative_error(out, expected) <= FP32_TOLERANCE


def test_empty_sets_give_zeros():
    problem = list(make_problem(2, 9, 3, 7))
    problem[6] = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    out, row_sumsq = run_kernel(problem, torch.float32, signed_sqrt=True, with_row_sumsq=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(row_sumsq, torch.zeros_like(row_sumsq))


LOW_PRECISION = [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        dispatch.triton_interpreted(),
        reason="Triton's interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584, "
               "bf16 unsupported there); covered on a GPU")),
]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("latent", [7, TILED_LATENT])
def test_low_precision_within_torch_error(dtype, latent):
    """fp16/bf16 tiles with fp32 accumulation: the error may be at most twice that of the torch reference
    evaluated in the same dtype, plus a small absolute slack (the flash-attention test criterion)."""
    problem = make_problem(3, 50, 17, latent)
    expected = expected_fv(problem)
    out, _ = run_kernel(problem, dtype)
    z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths = problem
    torch_out = reference.fv_accumulate_reference(*(t.to(dtype) for t in (z, x, dec_weight, dec_bias, inv_sigma2,
                                                                            fisher_rsqrt)), lengths)
    torch_error = (torch_out.double() - expected).abs().max()
    slack = 1e-3 * expected.abs().max()
    assert (out.double() - expected).abs().max() <= 2 * torch_error + slack


def test_split_heuristic():
    """Enough programs: no split. One long set on few programs: splits that fill the SMs, each with at
    least MIN_T_PER_SPLIT descriptors."""
    sm_count = triton_fv.sm_count(DEVICE)
    long_set = 2 * sm_count * triton_fv.MIN_T_PER_SPLIT
    assert triton_fv.choose_t_splits(sm_count, long_set, 1, 1, DEVICE) == 1  # one program per SM already
    assert triton_fv.choose_t_splits(1, long_set, 1, 1, DEVICE) == sm_count
    assert triton_fv.choose_t_splits(1, 2 * triton_fv.MIN_T_PER_SPLIT, 1, 1, DEVICE) == min(2, sm_count)
    assert triton_fv.choose_t_splits(1, triton_fv.MIN_T_PER_SPLIT - 1, 1, 1, DEVICE) == 1


def test_rejects_nonpositive_t_splits():
    with pytest.raises(ValueError, match="t_splits"):
        run_kernel(make_problem(2, 5, 3, 7), torch.float32, t_splits=0)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="torch < 2.9 has only the legacy allow_tf32 flag")
@pytest.mark.parametrize("setting", ["matmul", "global"])
def test_dot_precision_follows_torch_tf32_api(setting):
    """torch's fp32_precision API, per matmul or global: reading the legacy flag after it raises in torch,
    so the launcher must read the new one."""
    owner = torch.backends.cuda.matmul if setting == "matmul" else torch.backends
    saved = owner.fp32_precision
    try:
        owner.fp32_precision = "tf32"
        assert triton_fv.fp32_dot_precision("tf32x3") == "tf32"
        owner.fp32_precision = "ieee"
        assert triton_fv.fp32_dot_precision("tf32x3") == "tf32x3"
    finally:
        owner.fp32_precision = saved
    assert triton_fv.fp32_dot_precision(triton_fv.FORWARD_FP32_PRECISION) == "tf32x3"
    assert triton_fv.fp32_dot_precision(triton_fv.BACKWARD_FP32_PRECISION) == "ieee"


@pytest.mark.parametrize("latent", [64, 256])
def test_tf32x3_prunes_only_fp32_configs(latent):
    """tf32x3's split operands cost registers in fp32 dots only: 16-bit problems keep every config they had."""
    def viable(element_size, precision):
        problem = triton_fv.TuningProblem(element_size, triton_fv.tile_plan(latent, element_size), precision,
                                          z_rows_aligned=True, shared_memory=227 * 1024)
        return triton_fv.viable_configs(triton_fv.GPU_CONFIGS, problem)
    assert viable(2, "tf32x3") == viable(2, "ieee")
    assert set(map(str, viable(4, "tf32x3"))) < set(map(str, triton_fv.GPU_CONFIGS))
    bf16 = torch.zeros(1, 1, latent, dtype=torch.bfloat16)
    assert triton_fv.forward_dot_precision(bf16) == "ieee"


def test_deterministic_mode_pins_the_config(monkeypatch):
    """Under torch.use_deterministic_algorithms the autotuner gets one candidate (no timing-dependent choice),
    under its own key, so that a shape tuned before deterministic mode was switched on does not keep its pick."""
    assert "DETERMINISTIC" in triton_fv._fv_accumulate_kernel.keys
    monkeypatch.setattr(triton_fv, "_device_shared_memory", lambda index: 227 * 1024)
    z = torch.zeros(2, 50, 256, dtype=torch.bfloat16)
    named_args = dict(z_ptr=z, stride_zn=50 * 256, stride_zt=256)
    meta = dict(BLOCK_D=256, D_TILES=1, BLOCK_K=256, DOT_PRECISION="ieee")
    tuned = triton_fv._prune_configs(triton_fv.GPU_CONFIGS, named_args, DETERMINISTIC=False, **meta)
    assert len(tuned) > 1
    assert triton_fv._prune_configs(triton_fv.GPU_CONFIGS, named_args, DETERMINISTIC=True, **meta) == tuned[:1]
