"""The "cpp" backend: the fused CPU kernels of csrc/cpu (forward and backward), called through the compiled module."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from fvkernels.ops._extension import extension, kernel_struct
from fvkernels.ops.kernel_args import FVAccumulateArgs


def launch(args: FVAccumulateArgs) -> None:
    if args.z.dtype == torch.float16 or (args.z.dtype == torch.bfloat16
                                         and not extension().cpu_bf16_kernel_available()):
        # The CPU kernels compute in float32 or float64, and in bfloat16 on CPUs with AVX512-BF16; other half
        # inputs are widened here (small next to the GEMMs).
        wide = {name: tensor.float() for name, tensor in args.float_inputs().items()}
        out_wide = torch.empty(args.out.shape, dtype=torch.float32)
        launch(args.replace(out=out_wide, **wide))
        args.out.copy_(out_wide)
        return
    extension().fv_accumulate_cpu(kernel_struct(args), torch.get_num_threads())


def backward(args: FVAccumulateArgs, grad_out: Tensor, needs: Sequence[bool]) -> List[Optional[Tensor]]:
    """The fused CPU backward (csrc/cpu/fv_accumulate_backward_kernel.h): gradients w.r.t. (z, x, dec_weight,
    dec_bias, inv_sigma2, x_scale) of the op before its signed square root, each None where `needs` says no.
    args is the forward call (its out unused); grad_out is ∂L/∂out, (N, C, d+1)."""
    if args.z.dtype in (torch.float16, torch.bfloat16):  # computed in float32, like the forward
        wide = {name: tensor.float() for name, tensor in args.float_inputs().items()}
        grad_out = grad_out.float()
        grads = backward(args.replace(out=grad_out, **wide), grad_out, needs)
        return [None if grad is None else grad.to(args.z.dtype) for grad in grads]
    z, x = args.z, args.x
    num_sets, set_size, latent = z.shape
    channels = x.shape[2]
    shapes = [z.shape, x.shape, (channels, latent), (channels,), (channels,), (num_sets, set_size)]
    grads = [z.new_empty(shape) if need else None for shape, need in zip(shapes, needs)]
    grad_out = grad_out.contiguous()
    struct = extension().FVAccumulateBackwardArgs()
    struct.forward = kernel_struct(args)
    struct.grad_out, struct.grad_out_stride_n = grad_out.data_ptr(), grad_out.stride(0)
    for name, grad in zip(("grad_z", "grad_x", "grad_weight", "grad_bias", "grad_inv_sigma2", "grad_x_scale"), grads):
        if grad is not None:
            setattr(struct, name, grad.data_ptr())
    extension().fv_accumulate_backward_cpu(struct, torch.get_num_threads())
    return grads
