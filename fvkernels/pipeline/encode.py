"""`fv_vae_encode`: CNN activations → normalised FV-VAE Fisher vectors (DESIGN §1, steps 1–8).

Every path reaches the kernels through the op family (fvkernels.ops): the pre-normalisation is folded into
the op as a per-descriptor scale, and the op applies the Fisher scaling and the signed square root at its
store and hands back per-row sums of squares for the L2 norm.
- Eager inference (no autograd) runs in chunks of sets through `fv_accumulate_out`, so that no N×T×C or
  N×T×hidden intermediate is alive at once: the encoder runs on row blocks and writes the latents in place.
- When autograd records (training, fine-tuning a backbone through the layer), while torch.compile or
  torch.export traces, inside torch.func transforms and under torch.autocast (whose dtypes the intermediates
  take), the whole batch goes through the differentiable functional `fv_accumulate`.
Inputs are checked once per call, before any of that.
"""
from __future__ import annotations

import functools
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fvkernels.common.checks import all_finite, check_finite, check_finite_tensors, flag, tracing, transformed
from fvkernels.common.tensors import NORM_FLOOR, l2_normalize, length_mask
from fvkernels.ops import cpp, dispatch
from fvkernels.ops.fv_accumulate import fv_accumulate_functional, fv_accumulate_out_op
from fvkernels.ops.validation import autocasting, check_lengths, check_out, compute_dtype
from fvkernels.pipeline.params import EncoderLayer, FVVAEParams

SPP_LEVELS = ((2, 1), (3, 2), (4, 3), (7, 6))  # (kernel, stride) of the official 50-cell pyramid on 7×7 maps
SPP_CELLS = sum(((7 - k) // s + 1) ** 2 for k, s in SPP_LEVELS)
# Intermediates (latents, encoder activations) may take this fraction of the output's size, but at
# least MIN_WORKSPACE_BYTES: large enough for efficient GEMMs, small next to the Fisher vectors.
WORKSPACE_FRACTION = 0.2
MIN_WORKSPACE_BYTES = 1 << 20
# On a GPU each chunk and row block costs host time (a few kernel launches of ~10 µs each, whatever their size):
# T=784 × 16 sets in 16 chunks of 3 row blocks took 10 ms of host time for 2.3 ms of device work on an H200. A
# floor of 256 MiB (a fraction of a percent of a data-centre card's memory) encodes such batches in one chunk.
MIN_GPU_WORKSPACE_BYTES = 256 << 20


def official_spp(maps: Tensor) -> Tensor:
    """The official release's spatial pyramid: (N, C, 7, 7) → (N, 50, C) max-pooled cells, contiguous, in the
    release's cell order (finest level first, the column index fastest within a level). Pooled channels-last:
    torch's CPU pooling vectorises over the channels there, and over the 7×7 positions of a channel in NCHW
    (256 frames of 512 channels: 11 ms against 70), and each level's cells come out already as (N, cells, C)."""
    num_sets, channels = maps.shape[:2]
    maps = maps.contiguous(memory_format=torch.channels_last)
    levels = [F.max_pool2d(maps, kernel, stride).permute(0, 2, 3, 1) for kernel, stride in SPP_LEVELS]
    return torch.cat([cells.reshape(num_sets, cells.shape[1] * cells.shape[2], channels) for cells in levels], 1)


# ---- validation ------------------------------------------------------------------------------------------

def check_encode_inputs(acts, params: FVVAEParams, lengths) -> Tuple[int, int, Optional[Tensor]]:
    """Checks fv_vae_encode's arguments; returns (N, T, lengths as int64 or None). Values are not read here."""
    if not isinstance(params, FVVAEParams):
        raise TypeError(f"params must be fvkernels.FVVAEParams, got {type(params).__name__}")
    if not isinstance(acts, Tensor):
        raise TypeError(f"acts must be a torch.Tensor (N, C, H, W) or (N, T, C), got {type(acts).__name__}")
    if not acts.dtype.is_floating_point:
        raise TypeError(f"acts must be a floating tensor, got {acts.dtype}")
    if acts.dtype != params.dtype and not autocasting(acts.device):
        raise TypeError(f"acts is {acts.dtype} but the FV-VAE parameters are {params.dtype}; convert one side: "
                        f"acts.to({params.dtype}), or the parameters (params.to({acts.dtype}), or layer.to("
                        f"{acts.dtype}) for an fvkernels.nn.FVVAE layer)")
    if acts.device != params.device:
        raise ValueError(f"acts is on {acts.device} but the FV-VAE parameters are on {params.device}; move one "
                         f"side: acts.to({str(params.device)!r}), or the parameters (params.to({str(acts.device)!r}), "
                         f"or layer.to({str(acts.device)!r}) for an fvkernels.nn.FVVAE layer)")
    channels = params.channels
    if acts.dim() == 4:
        if acts.shape[1] != channels:
            raise ValueError(f"acts (N, C, H, W) = {tuple(acts.shape)} has C = {acts.shape[1]} but params "
                             f"expect C = {channels}")
        if lengths is not None:
            raise ValueError("lengths applies to (N, T, C) descriptor sets; a (N, C, H, W) map uses all H·W positions")
        if params.spp == "official" and acts.shape[2:] != (7, 7):
            raise ValueError(f"spp='official' pools 7×7 maps, got acts of shape {tuple(acts.shape)}")
        num_sets, set_size = acts.shape[0], SPP_CELLS if params.spp else acts.shape[2] * acts.shape[3]
    elif acts.dim() == 3:
        if acts.shape[2] != channels:
            raise ValueError(f"acts (N, T, C) = {tuple(acts.shape)} has C = {acts.shape[2]} but params "
                             f"expect C = {channels}")
        if params.spp is not None:
            raise ValueError("spp='official' needs (N, C, 7, 7) feature maps, got (N, T, C) descriptor sets "
                             f"of shape {tuple(acts.shape)}")
        num_sets, set_size = acts.shape[:2]
    else:
        raise ValueError(f"acts must be (N, C, H, W) feature maps or (N, T, C) descriptor sets, "
                         f"got shape {tuple(acts.shape)}")
    return num_sets, set_size, check_lengths(lengths, num_sets, set_size, acts.device)


def check_finite_acts(acts: Tensor) -> None:
    def describe(sets):
        where = "" if sets is None else f" in set(s) {sets} (index along N)"
        return f"acts holds NaN or Inf{where}; clean or drop those samples"
    check_finite(acts, describe)


def check_finite_inputs(acts: Tensor, params: FVVAEParams) -> None:
    """Refuses NaN/±Inf in acts (naming the sets) or in the parameters (naming the tensor and index): one read from
    the device when all are finite. The parameters are checked on every call, not only when FVVAEParams is made:
    a layer's weights change in training, and a NaN weight does not always show in the output (a NaN decoder row
    zeroes its channel's share through the ReLU mask, leaving a finite, wrong Fisher vector)."""
    if not tracing() and all_finite([acts, *params.tensors()]):
        return
    check_finite_acts(acts)
    check_finite_tensors(params.named_tensors(), "the FV-VAE parameters must be finite: a diverged training run, or "
                         "damaged weights (retrain from the last good checkpoint, or reload them)")


def check_finite_result(fv: Tensor, row_sumsq: Optional[Tensor]) -> None:
    """Refuses Fisher vectors that came out NaN/±Inf from finite inputs, naming the sets: the sums overflowed. The
    kernels' per-row sums of squares (C numbers per set) stand witness for the vectors (C·(d+1))."""
    def describe(sets):
        where = "of some sets" if sets is None else f"of set(s) {sets} (index along N)"
        return (f"the Fisher vectors {where} overflowed {fv.dtype} although acts and the parameters are finite: the "
                "sums grow with the set size and ‖x̂‖²/σx²; pre-normalise (prenorm='descriptor' or 'map'), lower "
                "norm_scale, or encode in float64")
    check_finite(fv, describe, witness=row_sumsq)


# ---- the steps -------------------------------------------------------------------------------------------

def descriptor_sets(acts: Tensor, params: FVVAEParams) -> Tensor:
    """(N, T, C) descriptors as the encoder sees them (a view of NCHW maps when there is no SPP)."""
    if acts.dim() == 3:
        return acts
    if params.spp == "official":
        return official_spp(acts)
    return acts.flatten(2).transpose(1, 2)


def prenorm_scale(acts: Tensor, descriptors: Tensor, params: FVVAEParams, lengths: Optional[Tensor]) -> Optional[Tensor]:
    """x̂ = scale ⊙ x: (N, T) per-descriptor factors of DESIGN §1.1, or None for prenorm=None.

    "map" takes the norm of the whole map before SPP (as the release does) or of the valid descriptors.
    """
    if params.prenorm is None:
        return None
    # Norms in float32 at least: a float16 sum of squares overflows at 65504.
    accumulate = torch.promote_types(acts.dtype, torch.float32)
    if params.prenorm == "descriptor":
        norms = torch.linalg.vector_norm(descriptors, dim=2, dtype=accumulate)
    else:
        if acts.dim() == 4:
            squares = torch.linalg.vector_norm(acts.flatten(1), dim=1, dtype=accumulate).square()
        else:
            per_descriptor = torch.linalg.vector_norm(descriptors, dim=2, dtype=accumulate).square()
            valid = length_mask(lengths, descriptors.shape[1])
            if valid is not None:
                per_descriptor = per_descriptor * valid
            squares = per_descriptor.sum(1)
        norms = squares.sqrt()[:, None].expand(descriptors.shape[:2])
    # A zero descriptor's scale is huge but multiplies zeros: keep it finite in acts' dtype (inf·0 is NaN).
    return (params.norm_scale / norms.clamp_min(NORM_FLOOR)).clamp_max(torch.finfo(acts.dtype).max).to(acts.dtype)


def encoder_forward(x: Tensor, encoder: Sequence[EncoderLayer], x_scale: Optional[Tensor] = None, *,
                    out: Optional[Tensor] = None) -> Tensor:
    """µ_z = the inference MLP of x̂ = x_scale ⊙ x, (…, C) → (…, d) (DESIGN §1.3). The scale is applied after
    the first GEMM (it is linear), so x̂ is never materialised. Without autograd the layers work in place and the
    last one writes into `out` when given; with autograd every step is out of place."""
    in_place = not torch.is_grad_enabled()
    hidden = x
    last = len(encoder) - 1
    for index, (weight, bias, relu) in enumerate(encoder):
        scale = x_scale.unsqueeze(-1) if index == 0 and x_scale is not None else None
        if in_place and _fused_linear_applies(hidden, weight):
            if scale is None:
                hidden = _fused_linear(hidden, weight, bias, relu)
            else:  # the scale comes before the bias
                hidden = _fused_linear(hidden, weight, None, False).mul_(scale).add_(bias)
                hidden = hidden.relu_() if relu else hidden
            if index == last and out is not None:  # oneDNN's op has no out=: one temporary (_workspace_plan)
                hidden = out.copy_(hidden)
            continue
        hidden = torch.matmul(hidden, weight.t(), out=out if in_place and index == last else None)
        if scale is not None:
            hidden = hidden.mul_(scale) if in_place else hidden * scale
        hidden = hidden.add_(bias) if in_place else hidden + bias
        if relu:
            hidden = hidden.relu_() if in_place else hidden.relu()
    return hidden


def _fused_linear_applies(hidden: Tensor, weight: Tensor) -> bool:
    """Whether an inference layer goes through oneDNN's fused linear (GEMM, bias and ReLU in one call): eager CPU
    float32/bfloat16 outside torch.autocast (whose casts the op does not follow), on a torch and CPU where that op
    passed its check for the dtype. Its fp32 GEMM can run at twice the rate of torch.matmul's BLAS (an AMD EPYC with
    AVX-512: 430 against 213 GFLOP/s, MKL taking a narrower code path there); in bf16 both are oneDNN, and the
    fusion saves the passes over the activations."""
    return (hidden.device.type == "cpu" and hidden.dtype in (torch.float32, torch.bfloat16)
            and weight.dtype == hidden.dtype and hidden.shape[-1] > 0 and not tracing() and not transformed()
            and not torch.is_autocast_enabled("cpu") and _fused_linear_works(hidden.dtype))


def _fused_linear(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], relu: bool) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(hidden, weight.contiguous(), None if bias is None else bias.contiguous(),
                                              "relu" if relu else "none", [], "")


@functools.lru_cache(maxsize=None)
def _fused_linear_works(dtype: torch.dtype) -> bool:
    """Whether this torch has oneDNN's fused linear (a private op that inductor uses) and it computes in `dtype` what
    a float64 matmul does, checked once per dtype on a small case: where it is missing, refuses the dtype (oneDNN
    has no bf16 inner product on CPUs without AVX-512) or differs, matmul does the work. The check sets its own
    dtypes and runs outside autocast, so the caller's settings at the first call cannot decide it."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
                       for shape in ((2, 3, 5), (4, 5), (4,)))
    try:
        with torch.autocast("cpu", enabled=False), torch.no_grad():
            fused = _fused_linear(x.transpose(0, 1), weight, bias, True)
    except (RuntimeError, TypeError):
        return False
    expected = (x.double().transpose(0, 1) @ weight.double().t() + bias.double()).relu()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    return (fused.shape == (3, 2, 4) and fused.dtype == dtype
            and torch.allclose(fused.double(), expected, rtol=tolerance, atol=tolerance))


def prenormalised_sets(acts: Tensor, params: FVVAEParams, lengths=None) -> Tuple[Tensor, Optional[Tensor]]:
    """Validated steps 1–2 of DESIGN §1 (prenorm, SPP), materialised and differentiable: (x̂ (N, T, C),
    lengths as int64 or None). For training; encoding folds the prenorm into the op instead."""
    _, _, lengths = check_encode_inputs(acts, params, lengths)
    check_finite_inputs(acts, params)
    descriptors = descriptor_sets(acts, params)
    scale = prenorm_scale(acts, descriptors, params, lengths)
    return (descriptors if scale is None else descriptors * scale.unsqueeze(-1)), lengths


def _row_blocks(num_sets: int, set_size: int, max_rows: int) -> Iterator[Tuple[slice, slice]]:
    """Blocks of whole sets of at most max_rows descriptors, or, when one set is larger, row ranges of
    one set of balanced sizes (784 rows in blocks of 400 → 2 × 392, not 400 + 384)."""
    sets_per_block = max(1, max_rows // max(set_size, 1))
    if sets_per_block > 1 or set_size <= max_rows:
        for start in range(0, num_sets, sets_per_block):
            yield slice(start, start + sets_per_block), slice(None)
        return
    parts = -(-set_size // max_rows)
    bounds = [set_size * part // parts for part in range(parts + 1)]
    for index in range(num_sets):
        for begin, end in zip(bounds[:-1], bounds[1:]):
            yield slice(index, index + 1), slice(begin, end)


def _latents_in_blocks(descriptors: Tensor, scale: Optional[Tensor], params: FVVAEParams, max_rows: int) -> Tensor:
    """µ_z (n, T, d) of a chunk of sets, computed in row blocks of at most max_rows descriptors."""
    num_sets, set_size, _ = descriptors.shape
    latents = descriptors.new_empty((num_sets, set_size, params.latent_dim))
    for sets, rows in _row_blocks(num_sets, set_size, max_rows):
        # NCHW views stay views: the GEMM reads them strided (or copies one bounded block); the target, whole sets
        # or rows of one set, is contiguous.
        encoder_forward(descriptors[sets, rows], params.encoder, None if scale is None else scale[sets, rows],
                        out=latents[sets, rows])
    return latents


def _workspace_plan(params: FVVAEParams, num_sets: int, set_size: int, element: int, copies_rows: bool,
                    last_layer_temporary: bool, device: torch.device):
    """(sets per chunk, rows per encoder block) keeping the intermediates within the workspace: the
    chunk's latents (at most half of it) plus one row block's encoder activations (the rest)."""
    floor = MIN_GPU_WORKSPACE_BYTES if device.type == "cuda" else MIN_WORKSPACE_BYTES
    workspace = max(WORKSPACE_FRACTION * num_sets * params.dim * element, floor)
    latents_per_set = set_size * params.latent_dim * element
    sets_per_chunk = int(max(1, min(num_sets, workspace / 2 // max(latents_per_set, 1))))
    # The layers' outputs before the latents, which are written in place, or computed apart and copied there.
    outputs = [weight.shape[0] for weight, _, _ in params.encoder[:None if last_layer_temporary else -1]]
    # Alive per row: a copied input row (NCHW views), and two consecutive layer outputs at most.
    live = (params.channels if copies_rows else 0) + max([a + b for a, b in zip(outputs, outputs[1:])] + outputs + [1])
    rows_budget = max(workspace - sets_per_chunk * latents_per_set, 0)
    return sets_per_chunk, int(max(16, rows_budget // (live * element)))


def _takes_row_sums(dtype: torch.dtype) -> bool:
    # The kernels' per-row sums of squares are float32: enough for a float32 (or lower) output — its L2 norm and
    # its finiteness check — not for float64, whose squares may exceed float32's range.
    return dtype != torch.float64


def _encode_whole(acts, params, lengths, normalize, backend, num_sets):
    """All sets at once through the functional op: differentiable, and traceable by torch.compile/export.
    Returns (Fisher vectors, the kernel's row sums of squares or None)."""
    descriptors = descriptor_sets(acts, params)
    scale = prenorm_scale(acts, descriptors, params, lengths)
    latents = encoder_forward(descriptors, params.encoder, scale)
    with_row_sumsq = _takes_row_sums(acts.dtype)
    fv, row_sumsq = fv_accumulate_functional(latents, descriptors, params.dec_weight, params.dec_bias,
                                             params.inv_sigma2, params.fisher_rsqrt, lengths, scale, normalize,
                                             with_row_sumsq, backend)
    fv = fv.reshape(num_sets, params.dim)
    row_sumsq = row_sumsq if with_row_sumsq else None
    if not normalize:
        return fv, row_sumsq
    return l2_normalize(fv, dim=1, squared_norms=None if row_sumsq is None else row_sumsq.sum(1, keepdim=True)), \
        row_sumsq


@torch.no_grad()
def _encode_chunked(acts, params, lengths, normalize, backend, num_sets, set_size, out):
    """Chunks of sets through the out-variant op, with one chunk's intermediates alive at a time."""
    channels, latent = params.channels, params.latent_dim
    if out is None:
        out = acts.new_empty((num_sets, params.dim))
        cpp.advise_huge_pages(out)  # filled chunk by chunk, each too small for the kernel's own advice
    out_sets = out.view(num_sets, channels, latent + 1)
    row_sumsq = (torch.empty((num_sets, channels), dtype=torch.float32, device=acts.device)
                 if _takes_row_sums(acts.dtype) else None)
    copies_rows = acts.dim() == 4 and params.spp is None  # NCHW views are copied row block by row block
    last_layer_temporary = _fused_linear_applies(acts, params.encoder[-1][0])
    sets_per_chunk, max_rows = _workspace_plan(params, num_sets, set_size, acts.element_size(), copies_rows,
                                               last_layer_temporary, acts.device)
    inv_sigma2, fisher_rsqrt = params.inv_sigma2, params.fisher_rsqrt  # derived on each access: once for all chunks
    for start in range(0, num_sets, sets_per_chunk):
        chunk = slice(start, start + sets_per_chunk)
        acts_chunk = acts[chunk]
        chunk_lengths = None if lengths is None else lengths[chunk]
        descriptors = descriptor_sets(acts_chunk, params)
        scale = prenorm_scale(acts_chunk, descriptors, params, chunk_lengths)
        latents = _latents_in_blocks(descriptors, scale, params, max_rows)
        fv_accumulate_out_op(latents, descriptors, params.dec_weight, params.dec_bias, inv_sigma2, fisher_rsqrt,
                             chunk_lengths, scale, normalize, backend, out_sets[chunk],
                             None if row_sumsq is None else row_sumsq[chunk])
        del latents  # before the next chunk allocates its own: one chunk's intermediates alive at a time
    if normalize:
        l2_normalize(out, dim=1, squared_norms=None if row_sumsq is None else row_sumsq.sum(1, keepdim=True),
                     in_place=True)
    return out, row_sumsq


def fv_vae_encode(acts: Tensor, params: FVVAEParams, *, lengths=None, normalize: bool = True,
                  backend: str = "auto", out: Optional[Tensor] = None) -> Tensor:
    """FV-VAE Fisher vectors (N, C·(d+1)) of CNN activations (DESIGN §1 steps 1–8).

    acts: (N, C, H, W) feature maps (each map one set of H·W descriptors, or 50 SPP cells with
    params.spp="official") or (N, T, C) descriptor sets with optional lengths (N,). normalize: signed
    square root then L2 (the "improved" FV); an empty set gives the zero vector. backend as in
    fv_accumulate. Differentiable w.r.t. acts and the params' tensors when autograd is recording.
    out: an (N, C·(d+1)) buffer to write into, for inference loops (see fv_accumulate).
    """
    num_sets, set_size, lengths = check_encode_inputs(acts, params, lengths)
    normalize = flag("normalize", normalize)
    # Checks the choice now; the op gets the caller's word and resolves it where it runs (portable graphs).
    dispatch.resolve(backend, acts.device, compute_dtype(acts.dtype, acts.device, out))
    check_finite_inputs(acts, params)
    if out is not None:
        check_out(out, (num_sets, params.dim), acts, dict(acts=acts, **params.named_tensors()))
    differentiable = torch.is_grad_enabled() and (acts.requires_grad or any(t.requires_grad for t in params.tensors()))
    if differentiable or tracing() or transformed() or autocasting(acts.device):
        fv, row_sumsq = _encode_whole(acts, params, lengths, normalize, backend, num_sets)
        fv = fv if out is None else out.copy_(fv)
    else:
        fv, row_sumsq = _encode_chunked(acts, params, lengths, normalize, backend, num_sets, set_size, out)
    check_finite_result(fv, row_sumsq)
    return fv
