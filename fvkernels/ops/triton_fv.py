"""The "triton" backend: the fused FV-VAE accumulation (csrc/fv_accumulate.h) as one Triton kernel.

The shape of the work is the flash-attention backward for dK/dV: a program owns one output block,
G[c-block, d-tile] of one set, keeps it in fp32 on chip and walks the set's descriptors in T-blocks.
Per block it recomputes the decoder pre-activation tile Pᵀ = W_block · Zᵀ + b (when one tile covers d,
the W block stays resident like K/V in the tutorial; a wider d streams it in K chunks), masks it into
the residual Rᵀ and accumulates Rᵀ · Z. The bias column is the row sum of Rᵀ, kept apart so that the
tile width is a power of two ≥ d rather than ≥ d+1 (d = 255 gives 256-wide tiles, not 512).

Long sets on few programs (whole videos) split T across programs: each split writes its raw partial
sums to an fp32 workspace and a second kernel adds the splits in a fixed order (deterministic) and
applies the epilogue. A row's sum of squares (row_sumsq) comes from what the program stores: when d
spans several d-tiles each writes its tile's share to a small (d-tiles, N, C) workspace that the launcher
adds up, and when T is split the reduction kernel computes it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fvkernels.ops.dispatch import triton_interpreted
from fvkernels.ops.kernel_args import FVAccumulateArgs
from fvkernels.ops.validation import is_fake

# Output tiles are at most this many columns of d wide, by element size; a wider d is covered by a grid
# axis of d-tiles, each recomputing P over the full d. fp32 tiles are narrower because an "ieee" tl.dot
# runs on FMA units with both operands in registers. Under the interpreter, whose cost is per program and
# per operation, tiles stay small enough that d = 70 already takes the d-tiled, streamed-K path.
MAX_BLOCK_D = {2: 64, 4: 64} if triton_interpreted() else {2: 256, 4: 64}
# When d spans several tiles, P's reduction over d streams W and Z in chunks of this many columns.
STREAM_BLOCK_K = 32 if triton_interpreted() else 64
# The split-T heuristic assumes this channel block (the autotuner may pick another after the fact).
NOMINAL_BLOCK_C = 16 if triton_interpreted() else 64
# A split below this many descriptors costs more in workspace traffic than it gains in parallelism.
MIN_T_PER_SPLIT = 128
# The interpreter has no SMs; a small fixed count keeps the heuristic's behaviour testable.
INTERPRETER_SM_COUNT = 4
# The split reduction is memory-bound and small: fixed tiles, no tuning.
REDUCE_BLOCK_C = 16 if triton_interpreted() else 32
REDUCE_MAX_BLOCK_J = 64 if triton_interpreted() else 128

# The pruning model's budgets (triton_aot.py checks the model against the compiler's register and spill
# report): 32-bit registers per thread for accumulators and register-held tiles, and for fp32 "ieee"
# dots, which run on FMA units with operands in registers, outputs per thread × reduction depth.
MAX_TILE_REGISTERS = 128
MAX_FMA_OPERAND_LOAD = 512


@dataclass(frozen=True)
class TilePlan:
    """How d is tiled: output tiles BLOCK_D wide, D_TILES of them, P's reduction in BLOCK_K chunks."""
    block_d: int
    d_tiles: int
    block_k: int

    @property
    def resident_w(self) -> bool:
        """One tile covers d: the program's W block is loaded once and stays on chip."""
        return self.d_tiles == 1


def tile_plan(latent: int, element_size: int) -> TilePlan:
    block_d = min(triton.next_power_of_2(max(latent, 16)), MAX_BLOCK_D[element_size])
    d_tiles = max(1, triton.cdiv(latent, block_d))
    return TilePlan(block_d, d_tiles, block_d if d_tiles == 1 else min(block_d, STREAM_BLOCK_K))


def _config(block_c, block_t, num_warps, num_stages):
    return triton.Config({"BLOCK_C": block_c, "BLOCK_T": block_t}, num_warps=num_warps, num_stages=num_stages)


# H100/H200 candidates, pruned per launch by viable_configs. BLOCK_C is the MMA row count of both
# products (64 per warpgroup for wgmma), BLOCK_T the reduction depth of the second. 256-wide tiles need
# 8 warps for their fp32 accumulator; BLOCK_C = 128 and 4 warps serve narrower ones; the small
# configs are what fp32 "ieee" dots and unaligned 16-bit Z rows can afford.
GPU_CONFIGS = [
    _config(64, 64, 8, 2),
    _config(64, 64, 8, 3),
    _config(64, 32, 8, 3),
    _config(128, 64, 8, 2),
    _config(128, 32, 8, 3),
    _config(64, 64, 4, 3),
    _config(64, 32, 4, 3),
    _config(64, 16, 8, 2),
    _config(128, 16, 8, 2),
    _config(64, 16, 4, 2),
    _config(32, 32, 4, 2),
]
INTERPRETER_CONFIGS = [_config(16, 16, 1, 1)]
CONFIGS = INTERPRETER_CONFIGS if triton_interpreted() else GPU_CONFIGS


@dataclass(frozen=True)
class TuningProblem:
    """What the pruning model knows about a launch."""
    element_size: int
    plan: TilePlan
    dot_precision: str
    # z's set and row strides are multiples of 16 elements, as the JIT's divisibility hint needs:
    # otherwise 16-bit Z tiles cannot be vectorized or copied asynchronously and sit in registers.
    z_rows_aligned: bool
    shared_memory: int


def shared_memory_estimate(config, problem: TuningProblem) -> int:
    """Bytes of shared memory a config needs, counting the tiles it stages (an upper-bound model)."""
    block_c, block_t = config.kwargs["BLOCK_C"], config.kwargs["BLOCK_T"]
    plan = problem.plan
    residual_tile = block_c * block_t  # Rᵀ staged as an MMA operand
    per_stage = block_t * plan.block_d + block_c * block_t  # the Z tile and the Xᵀ tile
    if plan.resident_w:
        elements = block_c * plan.block_d + config.num_stages * per_stage + residual_tile
    else:  # the W and Z chunks of P's reduction are pipelined too
        elements = config.num_stages * (per_stage + (block_c + block_t) * plan.block_k) + residual_tile
    return problem.element_size * elements


def tile_registers(config, problem: TuningProblem) -> int:
    """32-bit registers per thread for the fp32 accumulators G and Pᵀ, plus the Z tile when it cannot
    bypass registers (one 16-bit element per register, as scalar loads leave them)."""
    block_c, block_t = config.kwargs["BLOCK_C"], config.kwargs["BLOCK_T"]
    values = block_c * (problem.plan.block_d + block_t)
    if problem.element_size < 4 and not problem.z_rows_aligned:
        values += block_t * problem.plan.block_d
    return values // (32 * config.num_warps)


def fma_operand_load(config, problem: TuningProblem) -> int:
    """For FMA-unit dots: outputs per thread × reduction depth, the larger over Pᵀ = W·Zᵀ and G += Rᵀ·Z."""
    block_c, block_t = config.kwargs["BLOCK_C"], config.kwargs["BLOCK_T"]
    threads = 32 * config.num_warps
    plan = problem.plan
    return max(block_c * block_t // threads * plan.block_k, block_c * plan.block_d // threads * block_t)


def split_operand_registers(config, problem: TuningProblem) -> int:
    """For "tf32x3" dots: 32-bit registers per thread for both products' operand tiles, each held as a high and a
    low TF32 part (Rᵀ and Z for G += Rᵀ·Z; the W and Z chunks for Pᵀ = W·Zᵀ). With it the model admits none of
    the configs whose tf32x3 compile spills past triton_aot's limit on sm_90 (d = 255, 256, 512)."""
    block_c, block_t = config.kwargs["BLOCK_C"], config.kwargs["BLOCK_T"]
    plan = problem.plan
    operands = block_t * plan.block_d + block_c * block_t + (block_c + block_t) * plan.block_k
    return 2 * operands // (32 * config.num_warps)


def fits(config, problem: TuningProblem) -> bool:
    registers = tile_registers(config, problem)
    if problem.element_size == 4 and problem.dot_precision == "tf32x3":  # 16-bit operands ignore the precision
        registers += split_operand_registers(config, problem)
    if registers > MAX_TILE_REGISTERS:
        return False
    on_fma_units = problem.element_size == 4 and problem.dot_precision == "ieee"
    if on_fma_units and fma_operand_load(config, problem) > MAX_FMA_OPERAND_LOAD:
        return False
    return shared_memory_estimate(config, problem) <= problem.shared_memory


def viable_configs(configs, problem: TuningProblem) -> list:
    """The configs the model expects to fit. Never empty: the smallest config is the fallback
    (triton_aot.py shows whether it fits)."""
    viable = [config for config in configs if fits(config, problem)]
    return viable or [min(configs, key=lambda c: c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_T"] * c.num_stages)]


def divisible_by_16(*values: int) -> bool:
    """Whether the JIT gives all these int arguments its divisibility-by-16 hint (alignment proofs)."""
    return all(value % 16 == 0 for value in values)


@functools.lru_cache(maxsize=None)
def _device_shared_memory(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _launch_configs(configs, element_size: int, plan: TilePlan, dot_precision: str, z_strides, device_index: int,
                    deterministic: bool) -> list:
    """The configs a launch may time (viable_configs on this device; a single one is kept as triton's autotuner
    keeps it, unpruned)."""
    if len(configs) == 1:
        return list(configs)
    problem = TuningProblem(element_size=element_size, plan=plan, dot_precision=dot_precision,
                            z_rows_aligned=divisible_by_16(*z_strides),
                            shared_memory=_device_shared_memory(device_index))
    viable = viable_configs(configs, problem)
    # Timing picks the config, and BLOCK_T decides the summation order: under torch's deterministic mode
    # the first viable config is taken, so that every process and every rerun computes the same bits.
    return viable[:1] if deterministic else viable


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    z = args["z_ptr"]
    return _launch_configs(configs, z.element_size(), TilePlan(args["BLOCK_D"], args["D_TILES"], args["BLOCK_K"]),
                           args["DOT_PRECISION"], (args["stride_zn"], args["stride_zt"]), z.device.index,
                           args["DETERMINISTIC"])


# ---- kernels -------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(base, rows, cols, stride_row, stride_col, row_mask, col_mask, WIDE_OFFSETS: tl.constexpr):
    if WIDE_OFFSETS:  # 64-bit index arithmetic costs registers: only where 32 bits would wrap
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    return tl.load(base + rows[:, None] * stride_row + cols[None, :] * stride_col,
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _epilogue(g, fisher_ptrs, mask, HAS_FISHER: tl.constexpr, SIGNED_SQRT: tl.constexpr):
    """Fisher scaling and signed square root of raw sums g (fp32), as the output stores them."""
    if HAS_FISHER:
        g = g * tl.load(fisher_ptrs, mask=mask, other=0.0).to(tl.float32)
    if SIGNED_SQRT:
        root = tl.sqrt(tl.abs(g))
        g = tl.where(g < 0, -root, root)
    return g


@triton.jit
def _store_rows(ptrs, values, mask):
    """Stores values in the destination's dtype; returns each row's sum of squares of what was stored."""
    stored = values.to(ptrs.dtype.element_ty)
    tl.store(ptrs, stored, mask=mask)
    stored = tl.where(mask, stored.to(tl.float32), 0.0)
    return tl.sum(stored * stored, axis=1)


# Keyed also on what the pruning depends on (precision, z's row stride, deterministic mode) and on the index
# width; tensor dtypes are added by triton. The autotuner prunes only for a key it has not seen yet.
_TUNING_KEY = ["C", "LATENT", "t_splits", "DOT_PRECISION", "stride_zt", "WIDE_OFFSETS", "DETERMINISTIC"]


@triton.autotune(configs=CONFIGS, key=_TUNING_KEY, prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _fv_accumulate_kernel(
        z_ptr, x_ptr, x_scale_ptr, w_ptr, bias_ptr, inv_sigma2_ptr, fisher_ptr, lengths_ptr, dst_ptr,
        row_sumsq_ptr,
        N, T, C, t_splits,
        stride_zn, stride_zt, stride_zk,
        stride_xn, stride_xt, stride_xc,
        stride_sn, stride_st,
        stride_wc, stride_wk,
        dst_stride_set, dst_stride_split,
        LATENT: tl.constexpr, BLOCK_D: tl.constexpr, D_TILES: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_X_SCALE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_FISHER: tl.constexpr,
        SIGNED_SQRT: tl.constexpr, HAS_ROW_SUMSQ: tl.constexpr, FINISH: tl.constexpr,
        DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr, DETERMINISTIC: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """G[c-block, d-tile] of one set over one T-split. FINISH: apply the epilogue and write `out`;
    otherwise write raw fp32 sums to the (splits, N, C, d+1) workspace. DETERMINISTIC only selects the
    autotuning (see _prune_configs)."""
    # One flat grid, channel blocks fastest: programs that run together share the set's Z and X tiles
    # in L2, and N·splits is not bounded by the 65535 limit of the other grid axes.
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    c_block = pid % c_blocks
    d_tile = (pid // c_blocks) % D_TILES
    split_of_set = pid // (c_blocks * D_TILES)
    split = (split_of_set % t_splits).to(tl.int64)
    n = (split_of_set // t_splits).to(tl.int64)

    rows = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < C
    chunk = tl.arange(0, BLOCK_D)
    cols = d_tile * BLOCK_D + chunk
    col_mask = cols < LATENT

    if HAS_LENGTHS:  # promised to lie in [0, T]; clamped so that a broken promise cannot read outside the set
        length = tl.minimum(tl.maximum(tl.load(lengths_ptr + n), 0), T).to(tl.int32)
    else:
        length = T
    t_per_split = tl.cdiv(tl.cdiv(T, t_splits), BLOCK_T) * BLOCK_T
    t_begin = split.to(tl.int32) * t_per_split
    t_end = tl.minimum(t_begin + t_per_split, length)

    bias = tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    inv_sigma2 = tl.load(inv_sigma2_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    z_set = z_ptr + n * stride_zn
    x_set = x_ptr + n * stride_xn
    if D_TILES == 1:  # the whole W block fits one tile: load it once, like K/V in the attention backward
        w_resident = _load_tile(w_ptr, rows, chunk, stride_wc, stride_wk, row_mask, chunk < LATENT, WIDE_OFFSETS)

    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_C, 1), dtype=tl.float32)
    for t_start in range(t_begin, t_end, BLOCK_T):
        t = t_start + tl.arange(0, BLOCK_T)
        t_mask = t < t_end
        z_tile = _load_tile(z_set, t, cols, stride_zt, stride_zk, t_mask, col_mask, WIDE_OFFSETS)
        pre_t = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32) + bias[:, None]
        if D_TILES == 1:
            pre_t = tl.dot(w_resident, tl.trans(z_tile), pre_t, input_precision=DOT_PRECISION)
        else:  # K = d streamed in BLOCK_K chunks, a plain matmul loop the compiler pipelines
            for k_start in range(0, LATENT, BLOCK_K):
                ks = k_start + tl.arange(0, BLOCK_K)
                k_mask = ks < LATENT
                w_chunk = _load_tile(w_ptr, rows, ks, stride_wc, stride_wk, row_mask, k_mask, WIDE_OFFSETS)
                z_chunk = _load_tile(z_set, t, ks, stride_zt, stride_zk, t_mask, k_mask, WIDE_OFFSETS)
                pre_t = tl.dot(w_chunk, tl.trans(z_chunk), pre_t, input_precision=DOT_PRECISION)
        x_t = _load_tile(x_set, rows, t, stride_xc, stride_xt, row_mask, t_mask, WIDE_OFFSETS).to(tl.float32)
        if HAS_X_SCALE:
            t_scale = t.to(tl.int64) if WIDE_OFFSETS else t
            x_scale = tl.load(x_scale_ptr + n * stride_sn + t_scale * stride_st, mask=t_mask, other=0.0)
            x_t = x_t * x_scale.to(tl.float32)[None, :]
        # Padding rows of the T-block have Pᵀ = b, which may be positive: t_mask keeps them out.
        active = (pre_t > 0) & t_mask[None, :]
        residual_t = tl.where(active, (pre_t - x_t) * inv_sigma2[:, None], 0.0)
        acc = tl.dot(residual_t.to(z_tile.dtype), z_tile, acc, input_precision=DOT_PRECISION)
        bias_acc += tl.sum(residual_t, axis=1, keep_dims=True)

    dst_set = dst_ptr + split * dst_stride_split + n * dst_stride_set
    weight_offsets = rows[:, None] * (LATENT + 1) + cols[None, :]
    weight_mask = row_mask[:, None] & col_mask[None, :]
    bias_offsets = rows[:, None] * (LATENT + 1) + LATENT
    # The first d-tile owns the bias column. (A vector-vs-scalar compare, not `row_mask & (d_tile == 0)`:
    # the interpreter turns a bool scalar & bool vector into integers and rejects them as a mask.)
    bias_mask = (rows < tl.where(d_tile == 0, C, 0))[:, None]
    if FINISH:
        acc = _epilogue(acc, fisher_ptr + weight_offsets, weight_mask, HAS_FISHER, SIGNED_SQRT)
        bias_acc = _epilogue(bias_acc, fisher_ptr + bias_offsets, bias_mask, HAS_FISHER, SIGNED_SQRT)
    row_sumsq = (_store_rows(dst_set + weight_offsets, acc, weight_mask)
                 + _store_rows(dst_set + bias_offsets, bias_acc, bias_mask))
    if HAS_ROW_SUMSQ:  # with FINISH: this d-tile's share of its rows, one writer each
        tl.store(row_sumsq_ptr + (d_tile * N + n) * C + rows, row_sumsq, mask=row_mask)


@triton.jit
def _fv_reduce_splits_kernel(
        workspace_ptr, out_ptr, fisher_ptr, row_sumsq_ptr,
        C, t_splits, workspace_stride_split, workspace_stride_set, out_stride_set,
        ROW_LENGTH: tl.constexpr, HAS_FISHER: tl.constexpr, SIGNED_SQRT: tl.constexpr,
        HAS_ROW_SUMSQ: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    """Sums the T-splits' partials of one set's channel block in split order, then the epilogue."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = (pid // c_blocks).to(tl.int64)
    rows = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < C
    partials_set = workspace_ptr + n * workspace_stride_set
    row_sumsq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j_start in range(0, ROW_LENGTH, BLOCK_J):
        cols = j_start + tl.arange(0, BLOCK_J)
        offsets = rows[:, None] * ROW_LENGTH + cols[None, :]
        mask = row_mask[:, None] & (cols < ROW_LENGTH)[None, :]
        total = tl.zeros((BLOCK_C, BLOCK_J), dtype=tl.float32)
        for split in range(t_splits):
            total += tl.load(partials_set + split * workspace_stride_split + offsets, mask=mask, other=0.0)
        values = _epilogue(total, fisher_ptr + offsets, mask, HAS_FISHER, SIGNED_SQRT)
        row_sumsq += _store_rows(out_ptr + n * out_stride_set + offsets, values, mask)
    if HAS_ROW_SUMSQ:
        tl.store(row_sumsq_ptr + n * C + rows, row_sumsq, mask=row_mask)


# ---- host launcher -------------------------------------------------------------------------------------

# How tl.dot treats fp32 operands where the user has not allowed TF32 (fp16/bf16 operands ignore it), both within
# the ≤ 1e-5 contract against float64. The forward's "tf32x3" (each operand split into two TF32 parts, three tensor
# core products) measured on an H200 (T=784 × 16, C=512, d=256): 0.48 ms and error 3.5e-7, against "ieee" (FMA
# units) 2.22 ms and 4.2e-7, and "tf32" 0.28 ms and 5.9e-3. Elsewhere "ieee": on other architectures (without
# Hopper's wgmma, mma.sync keeps the split operands in registers, and every wide config spills on sm_80; Blackwell's
# are unmeasured) and in the backward's kernels, whose tf32x3 form has not run on a GPU.
FORWARD_FP32_PRECISION = "tf32x3"
BACKWARD_FP32_PRECISION = "ieee"
FORWARD_FP32_PRECISION_ARCHS = range(90, 100)  # Hopper: sm_90, sm_90a


def device_arch(device: torch.device) -> int:
    """The compute capability of a CUDA device as one number (90 for an H100)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def forward_fp32_precision(arch: int) -> str:
    """The forward kernel's fp32 tl.dot precision on a compute capability where TF32 is not allowed."""
    return FORWARD_FP32_PRECISION if arch in FORWARD_FP32_PRECISION_ARCHS else "ieee"


def forward_dot_precision(z: torch.Tensor) -> str:
    """The forward kernel's tl.dot precision for z's dtype and device: for fp32 operands forward_fp32_precision,
    "tf32" wherever the user allowed TF32; 16-bit operands ignore it ("ieee")."""
    if z.dtype != torch.float32 or z.device.type != "cuda" or triton_interpreted():
        full = "ieee"  # the interpreter computes every dot in numpy's float32 anyway
    else:
        full = forward_fp32_precision(device_arch(z.device))
    return fp32_dot_precision(full)


def fp32_dot_precision(full: str) -> str:
    """"tf32" (10-bit mantissa, ~1e-3) when the user allowed TF32 matmuls in torch; otherwise `full`."""
    matmul = torch.backends.cuda.matmul
    # torch ≥ 2.9 has fp32_precision (which also reflects the legacy flag and the global setting); reading
    # the legacy allow_tf32 there raises once anyone has used the new API.
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return "tf32" if matmul.allow_tf32 else full
    return "tf32" if precision == "tf32" else full


def needs_wide_offsets(z, x, x_scale, dec_weight) -> bool:
    """Whether an element offset the kernel forms within one set (or within W) can reach 2^31, as for a
    time-major view of a large batch or a very long set; the set offset itself is always 64-bit."""
    def reach(tensor, first_dim):
        return sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape[first_dim:], tensor.stride()[first_dim:]))
    reaches = [reach(z, 1), reach(x, 1), reach(dec_weight, 0)] + ([reach(x_scale, 1)] if x_scale is not None else [])
    return max(reaches) >= 2 ** 31


def reduce_block_j(row_length: int) -> int:
    """Columns per step of the split reduction: a power of two, at most REDUCE_MAX_BLOCK_J."""
    return min(triton.next_power_of_2(row_length), REDUCE_MAX_BLOCK_J)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of device (a fixed stand-in under the interpreter)."""
    if triton_interpreted():
        return INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_t_splits(num_sets: int, set_size: int, channels: int, d_tiles: int, device: torch.device) -> int:
    """How many programs share each set's T: one unless the grid would leave SMs idle, then as many
    as fit one wave while each split keeps ≥ MIN_T_PER_SPLIT descriptors."""
    programs = num_sets * triton.cdiv(channels, NOMINAL_BLOCK_C) * d_tiles
    sms = sm_count(device)
    if programs >= sms:
        return 1
    return max(1, min(sms // programs, set_size // MIN_T_PER_SPLIT))


_UNTUNED = contextvars.ContextVar("fvkernels_triton_untuned", default=False)


@contextlib.contextmanager
def untuned():
    """Launches inside take the first viable config, as under torch's deterministic mode, instead of timing every
    config: for checks of correctness (fvkernels.ops.verification), whose small problems are not worth tuning. On an
    H200 the self-test's three problems per dtype took 16–24 s with autotuning, most of it compiling and timing
    configs."""
    token = _UNTUNED.set(True)
    try:
        yield
    finally:
        _UNTUNED.reset(token)


def size_hint(size) -> int:
    """A size as a plain int without adding a guard: a traced symbolic size's example value. For the launcher's
    performance choices (T-splits, configs), so that a compiled graph serves every batch size; the kernel is
    correct for any of them."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return 1 if hint is None else int(hint)
    return int(size)


@functools.lru_cache(maxsize=None)
def _autotuner(configs: tuple):
    """_fv_accumulate_kernel's JIT function tuned over `configs` only, for graph capture: older torch releases do
    not run the pruning hook on a captured kernel (and Inductor times every config it is given), so the configs are
    pruned before the capture."""
    return triton.autotune(configs=list(configs), key=_TUNING_KEY)(_fv_accumulate_kernel.fn)


def _kernels(z: torch.Tensor, plan: TilePlan, dot_precision: str, deterministic: bool, capturable: bool):
    """The accumulate and reduce kernels to launch: the module's own, or (capturable) each through wrap_triton,
    which records the launch in a graph that torch.compile traces (and returns the kernel itself when it runs).
    Interpreted kernels are never wrapped: older torch releases refuse them."""
    if not capturable or triton_interpreted():
        return _fv_accumulate_kernel, _fv_reduce_splits_kernel
    configs = _launch_configs(CONFIGS, z.element_size(), plan, dot_precision,
                              [size_hint(stride) for stride in z.stride()[:2]], z.device.index, deterministic)
    return wrap_triton(_autotuner(tuple(configs))), wrap_triton(_fv_reduce_splits_kernel)


def launch(args: FVAccumulateArgs, *, t_splits: Optional[int] = None, capturable: bool = False) -> None:
    """Runs the kernel on one call's arguments (csrc/fv_accumulate.h). t_splits overrides the split-T heuristic
    (choose_t_splits); tests use it to reach the workspace path on small problems. capturable: launched through
    wrap_triton (see _kernels), for the body of fvkernels::fv_accumulate_triton."""
    z, x, x_scale, dec_weight, out, row_sumsq = args.z, args.x, args.x_scale, args.dec_weight, args.out, args.row_sumsq
    num_sets, set_size, latent, channels = args.num_sets, args.set_size, args.latent, args.channels
    if num_sets == 0 or channels == 0:
        return
    plan = tile_plan(latent, z.element_size())
    if t_splits is None:
        t_splits = choose_t_splits(size_hint(num_sets), size_hint(set_size), channels, plan.d_tiles, z.device)
    if t_splits < 1:
        raise ValueError(f"t_splits must be a positive number of T-splits, got {t_splits}")
    finish_in_place = t_splits == 1
    row_length = latent + 1
    if finish_in_place:
        dst, dst_stride_set, dst_stride_split = out, out.stride(0), 0
    else:
        dst = torch.empty((t_splits, num_sets, channels, row_length), dtype=torch.float32, device=z.device)
        dst_stride_set, dst_stride_split = dst.stride(1), dst.stride(0)
    # Row sums written by the accumulate kernel: straight into row_sumsq when one d-tile holds whole rows.
    tile_row_sums = None
    if finish_in_place and row_sumsq is not None:
        tile_row_sums = row_sumsq if plan.resident_w else torch.empty(
            (plan.d_tiles, num_sets, channels), dtype=torch.float32, device=z.device)
    # Absent optional tensors are never read (their flags are compile-time False); any pointer will do.
    placeholder = args.inv_sigma2
    x_scale_strides = x_scale.stride() if x_scale is not None else (0, 0)

    def or_placeholder(tensor):
        return placeholder if tensor is None else tensor

    def grid(meta):
        return (triton.cdiv(channels, meta["BLOCK_C"]) * plan.d_tiles * t_splits * num_sets,)

    dot_precision = forward_dot_precision(z)
    deterministic = torch.are_deterministic_algorithms_enabled() or _UNTUNED.get()
    accumulate_kernel, reduce_kernel = _kernels(z, plan, dot_precision, deterministic, capturable)
    # Triton launches on the current device (a traced tensor has none to enter: the compiled graph sets it).
    device_guard = torch.cuda.device(z.device) if z.is_cuda and not is_fake(z) else contextlib.nullcontext()
    with device_guard:
        accumulate_kernel[grid](
            z, x, or_placeholder(x_scale), dec_weight, args.dec_bias, args.inv_sigma2, or_placeholder(args.fisher_rsqrt),
            or_placeholder(args.lengths), dst, or_placeholder(tile_row_sums),
            num_sets, set_size, channels, t_splits,
            *z.stride(), *x.stride(), *x_scale_strides, *dec_weight.stride(),
            dst_stride_set, dst_stride_split,
            LATENT=latent, BLOCK_D=plan.block_d, D_TILES=plan.d_tiles, BLOCK_K=plan.block_k,
            HAS_X_SCALE=x_scale is not None, HAS_LENGTHS=args.lengths is not None,
            HAS_FISHER=args.fisher_rsqrt is not None, SIGNED_SQRT=args.signed_sqrt,
            HAS_ROW_SUMSQ=tile_row_sums is not None, FINISH=finish_in_place,
            DOT_PRECISION=dot_precision, WIDE_OFFSETS=needs_wide_offsets(z, x, x_scale, dec_weight),
            DETERMINISTIC=deterministic)
        if not finish_in_place:
            reduce_kernel[(triton.cdiv(channels, REDUCE_BLOCK_C) * num_sets,)](
                dst, out, or_placeholder(args.fisher_rsqrt), or_placeholder(row_sumsq),
                channels, t_splits, dst.stride(0), dst.stride(1), out.stride(0),
                ROW_LENGTH=row_length, HAS_FISHER=args.fisher_rsqrt is not None, SIGNED_SQRT=args.signed_sqrt,
                HAS_ROW_SUMSQ=row_sumsq is not None, BLOCK_C=REDUCE_BLOCK_C,
                BLOCK_J=reduce_block_j(row_length), num_warps=4)
        elif tile_row_sums is not None and tile_row_sums is not row_sumsq:
            torch.sum(tile_row_sums, 0, out=row_sumsq)


# ---- the backward ----------------------------------------------------------------------------------------
#
# The gradients of csrc/fv_accumulate.h (FVAccumulateBackwardArgs there) in two kernels that recompute the
# decoder tile as the forward does, with h = grad_out · fisher_rsqrt:
# - per (set, block of rows): P = Z·Wᵀ + b and A = Z·H_wᵀ + h_b per block of channels, their masked products
#   Q = ∂L/∂p and R = r, grad_x = −Q·x_scale, grad_x_scale = −Σ_c Q·x, and grad_z = Σ_c R·H_w + Q·W accumulated
#   over the channel blocks on chip;
# - per (block of channels, group of sets): the same P, A and Q, and grad_W += Qᵀ·Z, grad_b += Σ Q,
#   grad_inv_sigma2 += Σ 1(p > 0)·A·(p − x̂); groups write fp32 partial sums that the launcher adds in a fixed
#   order (deterministic).
# d is one tile (at most MAX_BACKWARD_D by element size); a wider d takes the reference's torch code. fp32
# "ieee" dots hold their operands in registers: past d = 64 the full-d tiles spill kilobytes on sm_90
# (triton_aot.py's report), where cuBLAS's GEMMs in the reference serve better.
MAX_BACKWARD_D = {2: 64, 4: 64} if triton_interpreted() else {2: 256, 4: 64}


@dataclass(frozen=True)
class BackwardTiles:
    block_t: int
    block_c: int
    num_warps: int
    num_stages: int = 3


def backward_tiles(element_size: int, latent: int) -> BackwardTiles:
    """Tiles of the backward kernels, sized by triton_aot.py's register and spill report for sm_90: fp32 "ieee"
    dots hold their operands in registers and take 16×16 tiles; 16-bit operands take 32×32 tiles, over 8 warps
    once d passes 128."""
    if triton_interpreted():
        return BackwardTiles(16, 16, 1, 1)
    if element_size == 4:
        return BackwardTiles(16, 16, 4)
    return BackwardTiles(32, 32, 8 if latent > 128 else 4)
# Groups of sets of the parameter-gradient kernel: enough programs for the SMs, each over several sets.
INTERPRETER_SET_GROUPS = 2


@triton.jit
def _decoder_gradient_tiles(z, n, c_block, rows, row_mask, x_ptr, x_scale_ptr, w_ptr, b_ptr, s_ptr, h, h_bias,
                            C, stride_xn, stride_xt, stride_xc, stride_sn, stride_st, stride_wc, stride_wk,
                            length, LATENT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                            HAS_X_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """For one block of rows and channels: the mask, R (the residual r), Q (∂L/∂p), A (∂L/∂r), P − x̂, x and
    the rows' x_scale, all fp32 [BLOCK_T, BLOCK_C] (x_scale [BLOCK_T])."""
    channels = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    ks = tl.arange(0, BLOCK_D)
    w = _load_tile(w_ptr, channels, ks, stride_wc, stride_wk, channel_mask, ks < LATENT, False)
    pre = tl.dot(z, tl.trans(w), input_precision=DOT_PRECISION, out_dtype=tl.float32)
    pre += tl.load(b_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)[None, :]
    a = tl.dot(z, tl.trans(h), input_precision=DOT_PRECISION, out_dtype=tl.float32) + h_bias[None, :]
    x = _load_tile(x_ptr + n.to(tl.int64) * stride_xn, rows, channels, stride_xt, stride_xc, row_mask, channel_mask,
                   False).to(tl.float32)
    if HAS_X_SCALE:
        scale = tl.load(x_scale_ptr + n.to(tl.int64) * stride_sn + rows * stride_st, mask=row_mask,
                        other=0.0).to(tl.float32)
    else:
        scale = tl.full(rows.shape, 1.0, tl.float32)
    inv_sigma2 = tl.load(s_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)[None, :]
    active = (pre > 0) & (rows < length)[:, None] & channel_mask[None, :]
    difference = pre - x * scale[:, None]
    residual = tl.where(active, difference * inv_sigma2, 0.0)
    q = tl.where(active, a * inv_sigma2, 0.0)
    return active, residual, q, a, difference, x, scale, w


@triton.jit
def _load_h(grad_out_ptr, fisher_ptr, n, channels, channel_mask, stride_gn, LATENT: tl.constexpr,
            BLOCK_D: tl.constexpr, HAS_FISHER: tl.constexpr):
    """h = grad_out[n] · fisher_rsqrt for a block of channels: H_w [BLOCK_C, BLOCK_D] and h_b [BLOCK_C], fp32."""
    ks = tl.arange(0, BLOCK_D)
    offsets = channels[:, None] * (LATENT + 1) + ks[None, :]
    mask = channel_mask[:, None] & (ks < LATENT)[None, :]
    h = tl.load(grad_out_ptr + n.to(tl.int64) * stride_gn + offsets, mask=mask, other=0.0).to(tl.float32)
    h_bias = tl.load(grad_out_ptr + n.to(tl.int64) * stride_gn + channels * (LATENT + 1) + LATENT, mask=channel_mask,
                     other=0.0).to(tl.float32)
    if HAS_FISHER:
        h *= tl.load(fisher_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        h_bias *= tl.load(fisher_ptr + channels * (LATENT + 1) + LATENT, mask=channel_mask, other=0.0).to(tl.float32)
    return h, h_bias


@triton.jit
def _fv_backward_rows_kernel(
        z_ptr, x_ptr, x_scale_ptr, w_ptr, b_ptr, s_ptr, fisher_ptr, lengths_ptr, grad_out_ptr,
        grad_z_ptr, grad_x_ptr, grad_scale_ptr, T, C,
        stride_zn, stride_zt, stride_zk, stride_xn, stride_xt, stride_xc, stride_sn, stride_st,
        stride_wc, stride_wk, stride_gn,
        LATENT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
        HAS_X_SCALE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_FISHER: tl.constexpr,
        NEED_Z: tl.constexpr, NEED_X: tl.constexpr, NEED_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    t_blocks = tl.cdiv(T, BLOCK_T)
    n = tl.program_id(0) // t_blocks
    rows = (tl.program_id(0) % t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    # lengths are promised in [0, T]; clamped, a broken promise cannot walk rows past T
    length = tl.minimum(tl.maximum(tl.load(lengths_ptr + n), 0), T) if HAS_LENGTHS else T
    ks = tl.arange(0, BLOCK_D)
    z = _load_tile(z_ptr + n.to(tl.int64) * stride_zn, rows, ks, stride_zt, stride_zk, row_mask, ks < LATENT, False)
    grad_z = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    grad_scale = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for c_block in range(0, tl.cdiv(C, BLOCK_C)):
        # Computed here, not taken from the helper: the index of a store that derives from a call's results counts,
        # for torch.compile's analysis, as writing every pointer the call was given (inputs then get copied).
        channels = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
        channel_mask = channels < C
        h, h_bias = _load_h(grad_out_ptr, fisher_ptr, n, channels, channel_mask, stride_gn, LATENT, BLOCK_D,
                            HAS_FISHER)
        active, residual, q, a, difference, x, scale, w = _decoder_gradient_tiles(
            z, n, c_block, rows, row_mask, x_ptr, x_scale_ptr, w_ptr, b_ptr, s_ptr, h.to(z.dtype), h_bias, C,
            stride_xn, stride_xt, stride_xc, stride_sn, stride_st, stride_wc, stride_wk, length, LATENT, BLOCK_D,
            BLOCK_C, HAS_X_SCALE, DOT_PRECISION)
        if NEED_X:
            offsets = (n.to(tl.int64) * T + rows[:, None]) * C + channels[None, :]
            tl.store(grad_x_ptr + offsets, (-q * scale[:, None]).to(grad_x_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & channel_mask[None, :])
        if NEED_SCALE:
            grad_scale -= tl.sum(q * x, 1)
        if NEED_Z:
            grad_z += tl.dot(residual.to(z.dtype), h.to(z.dtype), input_precision=DOT_PRECISION, out_dtype=tl.float32)
            grad_z += tl.dot(q.to(z.dtype), w, input_precision=DOT_PRECISION, out_dtype=tl.float32)
    if NEED_Z:
        offsets = (n.to(tl.int64) * T + rows[:, None]) * LATENT + ks[None, :]
        tl.store(grad_z_ptr + offsets, grad_z.to(grad_z_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (ks < LATENT)[None, :])
    if NEED_SCALE:
        tl.store(grad_scale_ptr + n.to(tl.int64) * T + rows, grad_scale.to(grad_scale_ptr.dtype.element_ty),
                 mask=row_mask)


@triton.jit
def _fv_backward_params_kernel(
        z_ptr, x_ptr, x_scale_ptr, w_ptr, b_ptr, s_ptr, fisher_ptr, lengths_ptr, grad_out_ptr,
        grad_w_ptr, grad_b_ptr, grad_s_ptr, N, T, C, sets_per_group,
        stride_zn, stride_zt, stride_zk, stride_xn, stride_xt, stride_xc, stride_sn, stride_st,
        stride_wc, stride_wk, stride_gn, stride_group_w, stride_group_c,
        LATENT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
        HAS_X_SCALE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_FISHER: tl.constexpr, NEED_W: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    c_blocks = tl.cdiv(C, BLOCK_C)
    c_block = tl.program_id(0) % c_blocks
    group = tl.program_id(0) // c_blocks
    ks = tl.arange(0, BLOCK_D)
    channels = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    grad_w = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    grad_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    grad_s = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first_set = group * sets_per_group
    for i in range(0, tl.minimum(first_set + sets_per_group, N) - first_set):
        n = first_set + i
        length = tl.minimum(tl.maximum(tl.load(lengths_ptr + n), 0), T) if HAS_LENGTHS else T
        h, h_bias = _load_h(grad_out_ptr, fisher_ptr, n, channels, channel_mask, stride_gn, LATENT, BLOCK_D,
                            HAS_FISHER)
        for t_block in range(0, tl.cdiv(length, BLOCK_T)):
            rows = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
            row_mask = rows < T
            z = _load_tile(z_ptr + n.to(tl.int64) * stride_zn, rows, ks, stride_zt, stride_zk, row_mask, ks < LATENT,
                           False)
            active, residual, q, a, difference, x, scale, w = _decoder_gradient_tiles(
                z, n, c_block, rows, row_mask, x_ptr, x_scale_ptr, w_ptr, b_ptr, s_ptr, h.to(z.dtype), h_bias, C,
                stride_xn, stride_xt, stride_xc, stride_sn, stride_st, stride_wc, stride_wk, length, LATENT,
                BLOCK_D, BLOCK_C, HAS_X_SCALE, DOT_PRECISION)
            grad_b += tl.sum(q, 0)
            grad_s += tl.sum(tl.where(active, a * difference, 0.0), 0)
            if NEED_W:
                grad_w += tl.dot(tl.trans(q.to(z.dtype)), z, input_precision=DOT_PRECISION, out_dtype=tl.float32)
    if NEED_W:
        offsets = group.to(tl.int64) * stride_group_w + channels[:, None] * LATENT + ks[None, :]
        tl.store(grad_w_ptr + offsets, grad_w, mask=channel_mask[:, None] & (ks < LATENT)[None, :])
    tl.store(grad_b_ptr + group.to(tl.int64) * stride_group_c + channels, grad_b, mask=channel_mask)
    tl.store(grad_s_ptr + group.to(tl.int64) * stride_group_c + channels, grad_s, mask=channel_mask)


def set_groups(num_sets: int, channel_blocks: int, device: torch.device) -> int:
    """Groups of sets for the parameter gradients: enough programs to fill the SMs once, a fixed number
    under the interpreter."""
    if triton_interpreted():
        return min(num_sets, INTERPRETER_SET_GROUPS)
    return max(1, min(num_sets, sm_count(device) // channel_blocks))


def _backward_kernels(capturable: bool):
    """The backward's two kernels: the module's own, or (capturable) each through wrap_triton, as _kernels."""
    if not capturable or triton_interpreted():
        return _fv_backward_rows_kernel, _fv_backward_params_kernel
    return wrap_triton(_fv_backward_rows_kernel), wrap_triton(_fv_backward_params_kernel)


def backward(args: FVAccumulateArgs, grad_out: torch.Tensor, needs, *, capturable: bool = False) -> list:
    """The fused Triton backward (the kernels above): gradients w.r.t. (z, x, dec_weight, dec_bias, inv_sigma2,
    x_scale) before the signed square root, each None where `needs` says no; a d wider than MAX_BACKWARD_D (for
    the element size) takes the reference's torch code. capturable: launched through wrap_triton, for the body of
    fvkernels::fv_accumulate_backward_triton (the choices from example sizes, as launch's, so that a captured graph
    holds for every batch size)."""
    from fvkernels.ops.reference import fv_accumulate_backward

    z, x, x_scale, dec_weight = args.z, args.x, args.x_scale, args.dec_weight
    num_sets, set_size, latent = z.shape
    channels = x.shape[2]
    if num_sets == 0 or channels == 0:  # no sets or no channels: every gradient asked for is zero
        shapes = [z.shape, x.shape, (channels, latent), (channels,), (channels,), (num_sets, set_size)]
        return [z.new_zeros(shape) if need else None for shape, need in zip(shapes, needs)]
    if latent > MAX_BACKWARD_D[z.element_size()] or latent == 0:
        grads = fv_accumulate_backward(grad_out, z, x, dec_weight, args.dec_bias, args.inv_sigma2,
                                       args.fisher_rsqrt, args.lengths, x_scale, (*needs[:5], False, needs[5]))
        return [*grads[:5], grads[6]]
    need_z, need_x, need_w, need_b, need_s, need_scale = needs
    grad_out = grad_out.contiguous()
    grad_z = torch.empty_like(z, memory_format=torch.contiguous_format) if need_z else None
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
    grad_scale = torch.empty((num_sets, set_size), dtype=z.dtype, device=z.device) if need_scale else None
    placeholder = args.inv_sigma2

    def or_placeholder(tensor):
        return placeholder if tensor is None else tensor
    x_scale_strides = x_scale.stride() if x_scale is not None else (0, 0)
    tiles = backward_tiles(z.element_size(), latent)
    common = dict(LATENT=latent, BLOCK_D=triton.next_power_of_2(max(latent, 16)), BLOCK_T=tiles.block_t,
                  BLOCK_C=tiles.block_c, HAS_X_SCALE=x_scale is not None, HAS_LENGTHS=args.lengths is not None,
                  HAS_FISHER=args.fisher_rsqrt is not None,
                  DOT_PRECISION=fp32_dot_precision(BACKWARD_FP32_PRECISION),
                  num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    inputs = (z, x, or_placeholder(x_scale), dec_weight, args.dec_bias, args.inv_sigma2,
              or_placeholder(args.fisher_rsqrt), or_placeholder(args.lengths), grad_out)
    strides = (*z.stride(), *x.stride(), *x_scale_strides, *dec_weight.stride(), grad_out.stride(0))
    rows_kernel, params_kernel = _backward_kernels(capturable)
    device_guard = torch.cuda.device(z.device) if z.is_cuda and not is_fake(z) else contextlib.nullcontext()
    with device_guard:
        if set_size > 0 and (need_z or need_x or need_scale):
            rows_kernel[(num_sets * triton.cdiv(set_size, tiles.block_t),)](
                *inputs, or_placeholder(grad_z), or_placeholder(grad_x), or_placeholder(grad_scale), set_size,
                channels, *strides, NEED_Z=need_z, NEED_X=need_x, NEED_SCALE=need_scale, **common)
        elif set_size == 0:
            for grad in (grad_z, grad_x, grad_scale):
                if grad is not None:
                    grad.zero_()
        grad_w = grad_b = grad_s = None
        if need_w or need_b or need_s:
            channel_blocks = triton.cdiv(channels, tiles.block_c)
            groups = set_groups(size_hint(num_sets), channel_blocks, z.device)
            partial_w = torch.empty((groups, channels, latent) if need_w else (1,), dtype=torch.float32,
                                    device=z.device)
            partial_b = torch.empty((groups, channels), dtype=torch.float32, device=z.device)
            partial_s = torch.empty((groups, channels), dtype=torch.float32, device=z.device)
            params_kernel[(channel_blocks * groups,)](
                *inputs, partial_w, partial_b, partial_s, num_sets, set_size, channels,
                triton.cdiv(num_sets, groups), *strides, channels * latent, channels, NEED_W=need_w, **common)
            # the groups' partial sums, added in a fixed order
            grad_w = partial_w.sum(0).to(z.dtype) if need_w else None
            grad_b = partial_b.sum(0).to(z.dtype) if need_b else None
            grad_s = partial_s.sum(0).to(z.dtype) if need_s else None
    return [grad_z, grad_x, grad_w, grad_b, grad_s, grad_scale]
