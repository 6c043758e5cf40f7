"""The "cuda" backend: the fused CUDA kernels of csrc/cuda (forward and backward), enqueued on torch's current
stream."""
from __future__ import annotations

import torch

from fvkernels.ops._extension import backward_struct, extension, kernel_struct
from fvkernels.ops.kernel_args import FVAccumulateArgs


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
    """The fused CUDA backward: gradients w.r.t. (z, x, dec_weight, dec_bias, inv_sigma2, x_scale) before the signed
    square root, each None where `needs` says no; where the kernels do not take the problem on this device (d past
    256, or more shared memory than it has) the reference's torch code."""
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
