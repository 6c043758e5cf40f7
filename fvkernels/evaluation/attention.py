"""Where a Fisher vector comes from: each descriptor's share of the FV (the paper's Appendix B maps)."""
from __future__ import annotations

import torch
from torch import Tensor

from fvkernels.ops.reference import decoder_residual
from fvkernels.pipeline.encode import encoder_forward, prenormalised_sets
from fvkernels.pipeline.params import FVVAEParams


@torch.no_grad()
def descriptor_contributions(acts: Tensor, params: FVVAEParams, lengths=None) -> Tensor:
    """Σ over the FV's entries of |descriptor t's term|, (N, T), before the signed √ and L2.

    Descriptor t adds r_t [z_t; 1]ᵀ ⊙ F^-½ to the raw FV, so its mass is Σ_c |r_tc| Σ_j |z̃_tj| F^-½_cj:
    one (T × (d+1)) · ((d+1) × C) GEMM per set. For (N, C, H, W) maps without SPP reshape to (N, H, W).
    """
    x_hat, lengths = prenormalised_sets(acts, params, lengths)
    latents = encoder_forward(x_hat, params.encoder)
    _, _, residual = decoder_residual(latents, x_hat, params.dec_weight, params.dec_bias, params.inv_sigma2, lengths)
    augmented = torch.cat([latents, torch.ones_like(latents[..., :1])], -1).abs()
    weights = params.fisher_rsqrt if params.fisher_rsqrt is not None else torch.ones_like(params.dec_weight[:, :1])
    column_mass = augmented @ weights.expand(params.channels, augmented.shape[-1]).t()
    return (residual.abs() * column_mass).sum(-1)
