"""Tensor pieces of DESIGN §1 that several layers use: which descriptors belong to a set, and the improved
normalisation (signed square root, then L2)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

NORM_FLOOR = 1e-12


def floor_for(dtype: torch.dtype, floor: float) -> float:
    """`floor`, raised to the smallest normal number of dtype: 1e-12 is 0 in float16, where a zero norm
    would then divide to inf and 0·inf to NaN."""
    return max(floor, torch.finfo(dtype).tiny)


def length_mask(lengths: Optional[Tensor], set_size: int) -> Optional[Tensor]:
    """(N, T) boolean mask of the descriptors inside each set's length, or None when lengths is None (all are)."""
    if lengths is None:
        return None
    return torch.arange(set_size, device=lengths.device) < lengths[:, None]


def signed_sqrt(v: Tensor) -> Tensor:
    """sign(v)·sqrt(|v|), exactly, as the kernels store it (its derivative is infinite at 0)."""
    return v.sign() * v.abs().sqrt()


def signed_sqrt_smooth(v: Tensor) -> Tensor:
    """sign(v)·sqrt(|v|) for |v| ≥ NORM_FLOOR (raised to the dtype's smallest normal number), linear below:
    v/√max(|v|, floor), whose derivative stays finite at 0, for code that differentiates through it."""
    return v * v.abs().clamp_min(floor_for(v.dtype, NORM_FLOOR)).rsqrt()


def l2_normalize(v: Tensor, dim: int = -1, *, squared_norms: Optional[Tensor] = None, in_place: bool = False) -> Tensor:
    """v divided by its L2 norms along dim (accumulated in float32 at least; a zero vector stays zero).
    squared_norms: the sums of squares along dim when already known (a kernel's row sums), keepdim-shaped."""
    if squared_norms is None:
        norms = torch.linalg.vector_norm(v, dim=dim, keepdim=True, dtype=torch.promote_types(v.dtype, torch.float32))
    else:
        norms = squared_norms.sqrt()
    norms = norms.clamp_min(floor_for(v.dtype, NORM_FLOOR)).to(v.dtype)
    return v.div_(norms) if in_place else v / norms


def improved_normalisation(fv: Tensor) -> Tensor:
    """The improved Fisher vector's normalisation of (N, D) rows (DESIGN §1.7): signed √, then L2.
    Differentiable everywhere; a zero row stays zero."""
    return l2_normalize(signed_sqrt_smooth(fv))


def signed_sqrt_derivative(root: Tensor) -> Tensor:
    """The derivative of signed_sqrt_smooth at v, expressed through root = sign(v)·√|v| (what a kernel stored, so
    that the backward needs no copy of v): 1/(2√|v|), and 1/√floor where signed_sqrt_smooth is linear."""
    floor = floor_for(root.dtype, NORM_FLOOR) ** 0.5
    magnitude = root.abs()
    return torch.where(magnitude >= floor, 0.5 / magnitude.clamp_min(floor), torch.full_like(magnitude, 1 / floor))
