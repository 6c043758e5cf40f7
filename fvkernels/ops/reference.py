"""The mathematics of the fused op in plain torch: the oracle every kernel is tested against.

Float64 capable and differentiable by ordinary autograd. It is also the ``"torch"`` backend and the
source of the backward formulas used for every backend (``fv_accumulate_backward``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fvkernels.common.tensors import length_mask
from fvkernels.common.tensors import signed_sqrt as signed_sqrt_of
from fvkernels.ops.kernel_args import FVAccumulateArgs


def prenormalised(x: Tensor, x_scale: Optional[Tensor]) -> Tensor:
    """x̂ = x_scale ⊙ x, the descriptors as the decoder reconstructs them."""
    return x if x_scale is None else x * x_scale.unsqueeze(-1)


def decoder_residual(z: Tensor, x: Tensor, dec_weight: Tensor, dec_bias: Tensor, inv_sigma2: Tensor,
                     lengths: Optional[Tensor] = None, x_scale: Optional[Tensor] = None):
    """Returns (pre-activation p, mask 1(p > 0) ∧ t < len, masked residual r) of DESIGN §1.4–5, all (N, T, C)."""
    pre = torch.baddbmm(dec_bias.expand(z.shape[0], 1, -1), z, dec_weight.t().expand(z.shape[0], -1, -1))
    active = pre > 0
    valid = length_mask(lengths, z.shape[1])
    if valid is not None:
        active = active & valid.unsqueeze(-1)
    residual = torch.where(active, (pre - prenormalised(x, x_scale)) * inv_sigma2,
                           torch.zeros((), dtype=pre.dtype, device=pre.device))
    return pre, active, residual


def fv_accumulate_reference(z: Tensor, x: Tensor, dec_weight: Tensor, dec_bias: Tensor, inv_sigma2: Tensor,
                            fisher_rsqrt: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                            x_scale: Optional[Tensor] = None) -> Tensor:
    """G of DESIGN §1.5 (times fisher_rsqrt, §1.6) as (N, C, d+1), bias column last."""
    _, _, residual = decoder_residual(z, x, dec_weight, dec_bias, inv_sigma2, lengths, x_scale)
    fv = outer_accumulate(residual, z)
    return fv if fisher_rsqrt is None else fv * fisher_rsqrt


def outer_accumulate(residual: Tensor, z: Tensor) -> Tensor:
    """Σ_t r_t [z_t; 1]ᵀ per set: (N, C, d+1) with the bias column last."""
    return torch.cat([residual.transpose(1, 2) @ z, residual.sum(1).unsqueeze(-1)], dim=-1)


def fv_accumulate_backward(grad_out: Tensor, z: Tensor, x: Tensor, dec_weight: Tensor, dec_bias: Tensor,
                           inv_sigma2: Tensor, fisher_rsqrt: Optional[Tensor], lengths: Optional[Tensor],
                           x_scale: Optional[Tensor], needs_grad: tuple) -> tuple:
    """Gradients of fv_accumulate_reference w.r.t. (z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt,
    x_scale), given grad_out, the gradient w.r.t. its output (before any signed square root).

    With H = grad_out ⊙ fisher_rsqrt split into H_w (C, d) and h_b (C,):
      A = z H_wᵀ + h_b          (∂L/∂r),        Q = A ⊙ 1(p > 0) ⊙ inv_sigma2   (∂L/∂p, = −∂L/∂x̂)
      ∂z = r H_w + Q W,   ∂W = Σ Qᵀ z,   ∂b = Σ Q,   ∂inv_sigma2 = Σ A ⊙ 1(p>0) ⊙ (p − x̂),
      ∂x = −Q ⊙ x_scale,  ∂x_scale = −Σ_c Q ⊙ x,  ∂fisher_rsqrt = Σ_n grad_out ⊙ G.
    All GEMM-shaped batched products over the sets; the 1(p>0) mask has zero derivative almost
    everywhere, so it is treated as a constant (as autograd does for ReLU).
    """
    need_z, need_x, need_w, need_b, need_s, need_f, need_scale = needs_grad
    pre, active, residual = decoder_residual(z, x, dec_weight, dec_bias, inv_sigma2, lengths, x_scale)
    scaled = grad_out if fisher_rsqrt is None else grad_out * fisher_rsqrt
    h_w, h_b = scaled[..., :-1], scaled[..., -1]
    d_residual = torch.baddbmm(h_b.unsqueeze(1), z, h_w.transpose(1, 2))
    d_active = torch.where(active, d_residual, torch.zeros((), dtype=d_residual.dtype, device=d_residual.device))
    d_pre = d_active * inv_sigma2

    grad_z = grad_x = grad_w = grad_b = grad_s = grad_f = grad_scale = None
    if need_z:
        grad_z = torch.bmm(residual, h_w) + d_pre @ dec_weight
    if need_x:
        grad_x = -prenormalised(d_pre, x_scale)
    if need_w:
        grad_w = torch.einsum("ntc,ntk->ck", d_pre, z)
    if need_b:
        grad_b = d_pre.sum((0, 1))
    if need_s:
        grad_s = (d_active * (pre - prenormalised(x, x_scale))).sum((0, 1))
    if need_f and fisher_rsqrt is not None:
        grad_f = (grad_out * outer_accumulate(residual, z)).sum(0)
    if need_scale and x_scale is not None:
        grad_scale = -(d_pre * x).sum(-1)
    return grad_z, grad_x, grad_w, grad_b, grad_s, grad_f, grad_scale


def fv_accumulate_outputs(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, x_scale, signed_sqrt: bool,
                          with_row_sumsq: bool):
    """The kernels' whole contract (csrc/fv_accumulate.h) in torch: (out (N, C, d+1), row sums of squares (N, C)
    float32, or None without them)."""
    fv = fv_accumulate_reference(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, x_scale)
    if signed_sqrt:
        fv = signed_sqrt_of(fv)
    return fv, fv.float().square().sum(-1) if with_row_sumsq else None


def launch(args: FVAccumulateArgs) -> None:
    """The "torch" backend."""
    out, row_sumsq = fv_accumulate_outputs(args.z, args.x, args.dec_weight, args.dec_bias, args.inv_sigma2,
                                           args.fisher_rsqrt, args.lengths, args.x_scale, args.signed_sqrt,
                                           args.row_sumsq is not None)
    args.out.copy_(out)
    if row_sumsq is not None:
        args.row_sumsq.copy_(row_sumsq)
