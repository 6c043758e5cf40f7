"""The "cuda" backend: the fused CUDA kernel of csrc/cuda, enqueued on torch's current stream."""
from __future__ import annotations

import torch

from fvkernels.ops._extension import extension, kernel_args


def launch(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, out, *, x_scale=None,
           signed_sqrt=False, row_sumsq=None) -> None:
    args = kernel_args(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, out, x_scale=x_scale,
                       signed_sqrt=signed_sqrt, row_sumsq=row_sumsq)
    with torch.cuda.device(z.device):
        # Scratch from torch's caching allocator (not the driver's pool, which torch's cache may have
        # left empty); freed here, it is reused only by work queued after the kernel on this stream.
        floats = extension().fv_accumulate_cuda_workspace_floats(args)
        if floats:
            workspace = torch.empty(floats, dtype=torch.float32, device=z.device)
            args.workspace, args.workspace_floats = workspace.data_ptr(), floats
        extension().fv_accumulate_cuda(args, torch.cuda.current_stream(z.device).cuda_stream)
