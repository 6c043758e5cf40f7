"""The "cpp" backend: the fused CPU kernel of csrc/cpu, called through the compiled module."""
from __future__ import annotations

import torch

from fvkernels.ops._extension import extension, kernel_args


def launch(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, out, *, x_scale=None,
           signed_sqrt=False, row_sumsq=None) -> None:
    if z.dtype in (torch.float16, torch.bfloat16):
        # The CPU kernel computes in float32 or float64; half inputs are widened here (small next to the GEMMs).
        wide = [None if t is None else t.float() for t in (z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, x_scale)]
        z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, x_scale = wide
        out_wide = torch.empty(out.shape, dtype=torch.float32)
        launch(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, out_wide, x_scale=x_scale,
               signed_sqrt=signed_sqrt, row_sumsq=row_sumsq)
        out.copy_(out_wide)
        return
    args = kernel_args(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, out, x_scale=x_scale,
                       signed_sqrt=signed_sqrt, row_sumsq=row_sumsq)
    extension().fv_accumulate_cpu(args, torch.get_num_threads())
