"""The "cuda" backend: the fused CUDA kernels of csrc/cuda (forward and backward), enqueued on torch's current
stream."""
from __future__ import annotations

import os

import torch

from fvkernels.ops._extension import backward_struct, extension, kernel_struct
from fvkernels.ops.kernel_args import FVAccumulateArgs

# The fused backward kernels (FFMA; one block per 16 channels for the parameter gradients) took 12.6 ms of device
# time for a training step at N=64 T=196 C=512 d=256 on an H200, where the reference's cuBLAS GEMMs took about
# 0.8 ms: the backward takes the reference's torch code unless this variable asks for the kernels (their GPU test
# does, so that they stay checked on hardware while they wait for tensor cores and a split over the sets).
FUSED_BACKWARD_VARIABLE = "FVK_CUDA_FUSED_BACKWARD"


def backward_enabled() -> bool:
    """Whether the backward below runs (dispatch.has_fused_backward): only where FVK_CUDA_FUSED_BACKWARD=1."""
    return os.environ.get(FUSED_BACKWARD_VARIABLE) == "1"


def launch(args: FVAccumulateArgs) -> None:
    struct = kernel_struct(args)
    device = args.z.device
    with torch.cuda.device(device):
        # Scratch from torch's caching allocator (not the driver's pool, which torch's cache may have
        # left empty); freed here, it is reused only by work queued after the kernel on this stream.
        floats = extension().fv_accumulate_cuda_workspace_floats(struct)
        if floats:
            workspace = torch.empty(floats, dtype=torch.float32, device=device)
            struct.workspace, struct.workspace_floats = workspace.data_ptr(), floats
        extension().fv_accumulate_cuda(struct, torch.cuda.current_stream(device).cuda_stream)


def backward(args: FVAccumulateArgs, grad_out: torch.Tensor, needs) -> list:
    """The fused CUDA backward (see backward_enabled): gradients w.r.t. (z, x, dec_weight, dec_bias, inv_sigma2,
    x_scale) before the signed square root, each None where `needs` says no; where the kernels do not take the
    problem on this device (d past 256, or more shared memory than it has) the reference's torch code."""
    device = args.z.device
    with torch.cuda.device(device):
        if not extension().fv_accumulate_backward_cuda_supported(kernel_struct(args)):
            from fvkernels.ops.reference import fv_accumulate_backward

            grads = fv_accumulate_backward(grad_out, args.z, args.x, args.dec_weight, args.dec_bias, args.inv_sigma2,
                                           args.fisher_rsqrt, args.lengths, args.x_scale,
                                           (*needs[:5], False, needs[5]))
            return [*grads[:5], grads[6]]
        grad_out = grad_out.contiguous()  # kept alive here: the struct holds its address
        struct, grads = backward_struct(args, grad_out, needs)
        extension().fv_accumulate_backward_cuda(struct, torch.cuda.current_stream(device).cuda_stream)
    return grads
