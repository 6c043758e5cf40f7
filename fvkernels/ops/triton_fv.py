"""The "triton" backend: the fused FV-VAE accumulation (csrc/fv_accumulate.h) as one Triton kernel.

The shape of the work is the flash-attention backward for dK/dV: a program owns one output block,
G[c-block, d-tile] of one set, keeps it in fp32 on chip and walks the set's descriptors in T-blocks.
Per block it recomputes the decoder pre-activation tile Pᵀ = W_block · Zᵀ + b (the W block stays
resident like K/V in the tutorial), masks it into the residual Rᵀ and accumulates Rᵀ · Z; the bias
column is the row sum of Rᵀ, kept apart so that the tile width is a power of two ≥ d rather than ≥ d+1.

Long sets on few programs (whole videos) split T across programs: each split writes its raw partial
sums to an fp32 workspace and a second kernel adds the splits in a fixed order (deterministic) and
applies the epilogue. The same workspace path serves row_sumsq when d spans several d-tiles, since a
row's sum of squares must have a single writer.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from fvkernels.ops.dispatch import triton_interpreted

# Output tiles are at most this wide (columns of d); a wider d is covered by a grid axis of d-tiles,
# each recomputing P over the full d. The interpreter uses narrow tiles so small tests reach that path.
MAX_BLOCK_D = 16 if triton_interpreted() else 256
# The split-T heuristic assumes this channel block (the autotuner may pick another after the fact).
NOMINAL_BLOCK_C = 16 if triton_interpreted() else 64
# A split below this many descriptors costs more in workspace traffic than it gains in parallelism.
MIN_T_PER_SPLIT = 128
# The interpreter has no SMs; a small fixed count keeps the heuristic's behaviour testable.
INTERPRETER_SM_COUNT = 4
# The split reduction is memory-bound and small: fixed tiles, no tuning.
REDUCE_BLOCK_C = 16 if triton_interpreted() else 32
REDUCE_MAX_BLOCK_J = 16 if triton_interpreted() else 128

# Budgets for pruning autotune configs before anything is compiled (checked by triton_aot.py):
# fp32 accumulator values per thread, and shared memory when the device cannot be asked.
MAX_ACCUMULATOR_PER_THREAD = 128
DEFAULT_SHARED_MEMORY = 166 * 1024


def _config(block_c, block_t, num_warps, num_stages):
    return triton.Config({"BLOCK_C": block_c, "BLOCK_T": block_t}, num_warps=num_warps, num_stages=num_stages)


# H100/H200 candidates: M = BLOCK_C is the MMA row count of both products (≥ 64 for wgmma), BLOCK_T
# the reduction depth of the second one. Small tiles exist for fp32 and d > 256, where big ones spill.
GPU_CONFIGS = [
    _config(128, 64, 8, 2),
    _config(128, 32, 8, 3),
    _config(64, 64, 4, 3),
    _config(64, 64, 8, 2),
    _config(64, 32, 4, 3),
    _config(64, 32, 4, 2),
    _config(64, 16, 4, 2),
]
INTERPRETER_CONFIGS = [_config(16, 16, 1, 1)]
CONFIGS = INTERPRETER_CONFIGS if triton_interpreted() else GPU_CONFIGS


def shared_memory_estimate(config, element_size, block_d, d_tiles):
    """Bytes of shared memory a config needs, by the operand tiles it stages (an upper-bound model)."""
    block_c, block_t = config.kwargs["BLOCK_C"], config.kwargs["BLOCK_T"]
    residual_tile = block_c * block_t  # Rᵀ staged as an MMA operand
    x_tile = block_c * block_t
    if d_tiles == 1:  # W resident once, Z pipelined
        per_stage = block_t * block_d + x_tile
        return element_size * (block_c * block_d + config.num_stages * per_stage + residual_tile)
    # W and Z chunks for every K step are pipelined, plus the output's Z tile
    per_stage = d_tiles * (block_c + block_t) * block_d + block_t * block_d + x_tile
    return element_size * (config.num_stages * per_stage + residual_tile)


def accumulator_per_thread(config, block_d):
    """fp32 values each thread holds for G and the Pᵀ tile."""
    block_c, block_t = config.kwargs["BLOCK_C"], config.kwargs["BLOCK_T"]
    return block_c * (block_d + block_t) // (32 * config.num_warps)


def viable_configs(configs, element_size, block_d, d_tiles, shared_memory):
    """The configs expected to fit (no spilling accumulator, shared memory within the device's)."""
    return [config for config in configs
            if accumulator_per_thread(config, block_d) <= MAX_ACCUMULATOR_PER_THREAD
            and shared_memory_estimate(config, element_size, block_d, d_tiles) <= shared_memory]


@functools.lru_cache(maxsize=None)
def _device_shared_memory(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    z = args["z_ptr"]
    shared_memory = _device_shared_memory(z.device.index) if z.is_cuda else DEFAULT_SHARED_MEMORY
    viable = viable_configs(configs, z.element_size(), args["BLOCK_D"], args["D_TILES"], shared_memory)
    # Never empty: the smallest config is the fallback, and triton_aot.py reports how it fits.
    return viable or [min(configs, key=lambda c: c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_T"] * c.num_stages)]


# ---- kernels -------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(base, rows, cols, stride_row, stride_col, row_mask, col_mask):
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
    stored = stored.to(tl.float32)
    return tl.sum(stored * stored, axis=1)


@triton.autotune(configs=CONFIGS, key=["C", "LATENT", "t_splits"],
                 prune_configs_by={"early_config_prune": _prune_configs})
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
        LATENT: tl.constexpr, BLOCK_D: tl.constexpr, D_TILES: tl.constexpr,
        HAS_X_SCALE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_FISHER: tl.constexpr,
        SIGNED_SQRT: tl.constexpr, HAS_ROW_SUMSQ: tl.constexpr, FINISH: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """G[c-block, d-tile] of one set over one T-split. FINISH: apply the epilogue and write `out`;
    otherwise write raw fp32 sums to the (splits, N, C, d+1) workspace."""
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

    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + n).to(tl.int32)
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
        w_resident = _load_tile(w_ptr, rows, chunk, stride_wc, stride_wk, row_mask, chunk < LATENT)

    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_C, 1), dtype=tl.float32)
    for t_start in range(t_begin, t_end, BLOCK_T):
        t = t_start + tl.arange(0, BLOCK_T)
        t_mask = t < t_end
        z_tile = _load_tile(z_set, t, cols, stride_zt, stride_zk, t_mask, col_mask)
        pre_t = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32) + bias[:, None]
        if D_TILES == 1:
            pre_t = tl.dot(w_resident, tl.trans(z_tile), pre_t, input_precision=DOT_PRECISION)
        else:  # K = d in chunks of the tile width; this tile's own chunk is loaded again (cache hit)
            for k_step in tl.static_range(D_TILES):
                ks = k_step * BLOCK_D + chunk
                k_mask = ks < LATENT
                w_chunk = _load_tile(w_ptr, rows, ks, stride_wc, stride_wk, row_mask, k_mask)
                z_chunk = _load_tile(z_set, t, ks, stride_zt, stride_zk, t_mask, k_mask)
                pre_t = tl.dot(w_chunk, tl.trans(z_chunk), pre_t, input_precision=DOT_PRECISION)
        x_t = _load_tile(x_set, rows, t, stride_xc, stride_xt, row_mask, t_mask).to(tl.float32)
        if HAS_X_SCALE:
            x_scale = tl.load(x_scale_ptr + n * stride_sn + t * stride_st, mask=t_mask, other=0.0)
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
    bias_mask = (row_mask & (d_tile == 0))[:, None]  # the first d-tile owns the bias column
    if FINISH:
        acc = _epilogue(acc, fisher_ptr + weight_offsets, weight_mask, HAS_FISHER, SIGNED_SQRT)
        bias_acc = _epilogue(bias_acc, fisher_ptr + bias_offsets, bias_mask, HAS_FISHER, SIGNED_SQRT)
    row_sumsq = (_store_rows(dst_set + weight_offsets, acc, weight_mask)
                 + _store_rows(dst_set + bias_offsets, bias_acc, bias_mask))
    if HAS_ROW_SUMSQ:  # only with FINISH and a single d-tile: this program holds whole rows
        tl.store(row_sumsq_ptr + n * C + rows, row_sumsq, mask=row_mask)


@triton.jit
def _fv_reduce_splits_kernel(
        workspace_ptr, out_ptr, fisher_ptr, row_sumsq_ptr,
        N, C, t_splits, out_stride_set,
        ROW_LENGTH: tl.constexpr, HAS_FISHER: tl.constexpr, SIGNED_SQRT: tl.constexpr,
        HAS_ROW_SUMSQ: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    """Sums the T-splits' partials of one set's channel block in split order, then the epilogue."""
    c_block = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    rows = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < C
    split_stride = N * C * ROW_LENGTH
    partials_set = workspace_ptr + n * C * ROW_LENGTH
    row_sumsq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j_start in tl.static_range(0, ROW_LENGTH, BLOCK_J):
        cols = j_start + tl.arange(0, BLOCK_J)
        offsets = rows[:, None] * ROW_LENGTH + cols[None, :]
        mask = row_mask[:, None] & (cols < ROW_LENGTH)[None, :]
        total = tl.zeros((BLOCK_C, BLOCK_J), dtype=tl.float32)
        for split in range(t_splits):
            total += tl.load(partials_set + split * split_stride + offsets, mask=mask, other=0.0)
        values = _epilogue(total, fisher_ptr + offsets, mask, HAS_FISHER, SIGNED_SQRT)
        row_sumsq += _store_rows(out_ptr + n * out_stride_set + offsets, values, mask)
    if HAS_ROW_SUMSQ:
        tl.store(row_sumsq_ptr + n * C + rows, row_sumsq, mask=row_mask)


# ---- host launcher -------------------------------------------------------------------------------------

def fp32_dot_precision() -> str:
    """How tl.dot treats fp32 operands (fp16/bf16 ones ignore it): "ieee" keeps the ≤ 1e-5 contract
    against float64; "tf32" only when the user allowed TF32 matmuls in torch."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def tile_width(latent: int) -> int:
    """Columns of d per output tile: a power of two ≥ 16 (MMA and tl.arange constraints)."""
    return min(triton.next_power_of_2(max(latent, 16)), MAX_BLOCK_D)


def _sm_count(device: torch.device) -> int:
    if triton_interpreted():
        return INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_t_splits(num_sets: int, set_size: int, channels: int, d_tiles: int, device: torch.device) -> int:
    """How many programs share each set's T: one unless the grid would leave SMs idle, then as many
    as fit one wave while each split keeps ≥ MIN_T_PER_SPLIT descriptors."""
    programs = num_sets * triton.cdiv(channels, NOMINAL_BLOCK_C) * d_tiles
    sm_count = _sm_count(device)
    if programs >= sm_count:
        return 1
    return max(1, min(sm_count // programs, set_size // MIN_T_PER_SPLIT))


def launch(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, out, *, x_scale=None,
           signed_sqrt=False, row_sumsq=None, t_splits=None) -> None:
    """Same contract as reference.launch (csrc/fv_accumulate.h). t_splits overrides the split-T
    heuristic (choose_t_splits); tests use it to reach the workspace path on small problems."""
    num_sets, set_size, latent = z.shape
    channels = x.shape[2]
    if num_sets == 0 or channels == 0:
        return
    block_d = tile_width(latent)
    d_tiles = max(1, triton.cdiv(latent, block_d))
    if t_splits is None:
        t_splits = choose_t_splits(num_sets, set_size, channels, d_tiles, z.device)
    if t_splits < 1:
        raise ValueError(f"t_splits must be a positive number of T-splits, got {t_splits}")
    finish_in_place = t_splits == 1 and (row_sumsq is None or d_tiles == 1)
    row_length = latent + 1
    if finish_in_place:
        dst, dst_stride_set, dst_stride_split = out, out.stride(0), 0
    else:
        dst = torch.empty((t_splits, num_sets, channels, row_length), dtype=torch.float32, device=z.device)
        dst_stride_set, dst_stride_split = dst.stride(1), dst.stride(0)
    # Absent optional tensors are never read (their flags are compile-time False); any pointer will do.
    placeholder = inv_sigma2
    x_scale_strides = x_scale.stride() if x_scale is not None else (0, 0)

    def grid(meta):
        return (triton.cdiv(channels, meta["BLOCK_C"]) * d_tiles * t_splits * num_sets,)

    device_guard = torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext()
    with device_guard:
        _fv_accumulate_kernel[grid](
            z, x, placeholder if x_scale is None else x_scale, dec_weight, dec_bias, inv_sigma2,
            placeholder if fisher_rsqrt is None else fisher_rsqrt,
            placeholder if lengths is None else lengths, dst,
            placeholder if row_sumsq is None else row_sumsq,
            num_sets, set_size, channels, t_splits,
            *z.stride(), *x.stride(), *x_scale_strides, *dec_weight.stride(),
            dst_stride_set, dst_stride_split,
            LATENT=latent, BLOCK_D=block_d, D_TILES=d_tiles,
            HAS_X_SCALE=x_scale is not None, HAS_LENGTHS=lengths is not None,
            HAS_FISHER=fisher_rsqrt is not None, SIGNED_SQRT=signed_sqrt,
            HAS_ROW_SUMSQ=row_sumsq is not None and finish_in_place, FINISH=finish_in_place,
            DOT_PRECISION=fp32_dot_precision())
        if not finish_in_place:
            _fv_reduce_splits_kernel[(triton.cdiv(channels, REDUCE_BLOCK_C), num_sets)](
                dst, out, placeholder if fisher_rsqrt is None else fisher_rsqrt,
                placeholder if row_sumsq is None else row_sumsq,
                num_sets, channels, t_splits, out.stride(0),
                ROW_LENGTH=row_length, HAS_FISHER=fisher_rsqrt is not None, SIGNED_SQRT=signed_sqrt,
                HAS_ROW_SUMSQ=row_sumsq is not None, BLOCK_C=REDUCE_BLOCK_C,
                BLOCK_J=min(triton.next_power_of_2(row_length), REDUCE_MAX_BLOCK_J), num_warps=4)
