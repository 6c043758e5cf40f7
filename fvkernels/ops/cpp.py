"""The "cpp" backend: the fused CPU kernels of csrc/cpu (forward and backward), called through the compiled module."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from fvkernels.ops._extension import backward_struct, extension, kernel_struct
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
    grad_out = grad_out.contiguous()  # kept alive here: the struct holds its address
    struct, grads = backward_struct(args, grad_out, needs)
    extension().fv_accumulate_backward_cpu(struct, torch.get_num_threads())
    return grads
