"""The "cpp" backend: the fused CPU kernels of csrc/cpu (forward and backward), called through the compiled module."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from fvkernels.ops._extension import IMPORT_ERROR, backward_struct, extension, kernel_struct
from fvkernels.ops.kernel_args import FVAccumulateArgs


def computed_wider(dtype: torch.dtype) -> bool:
    """Whether the CPU kernels take this dtype only widened to float32: they compute in float32 and float64, and in
    bfloat16 on CPUs with AVX512-BF16 (forward and backward); other half inputs are widened (small next to the
    GEMMs)."""
    return dtype == torch.float16 or (dtype == torch.bfloat16 and not extension().cpu_bf16_kernel_available())


def launch(args: FVAccumulateArgs) -> None:
    if computed_wider(args.z.dtype):
        wide = {name: tensor.float() for name, tensor in args.float_inputs().items()}
        out_wide = torch.empty(args.out.shape, dtype=torch.float32)
        launch(args.replace(out=out_wide, **wide))
        args.out.copy_(out_wide)
        return
    extension().fv_accumulate_cpu(kernel_struct(args), torch.get_num_threads())


def backward(args: FVAccumulateArgs, grad_out: Tensor, needs: Sequence[bool]) -> List[Optional[Tensor]]:
    """The fused CPU backward (csrc/cpu/fv_accumulate_backward_kernel.h; fv_accumulate_bf16_backward_kernel.h for
    bfloat16): gradients w.r.t. (z, x, dec_weight,
    dec_bias, inv_sigma2, x_scale) of the op before its signed square root, each None where `needs` says no.
    args is the forward call (its out unused); grad_out is ∂L/∂out, (N, C, d+1)."""
    if computed_wider(args.z.dtype):
        wide = {name: tensor.float() for name, tensor in args.float_inputs().items()}
        grad_out = grad_out.float()
        grads = backward(args.replace(out=grad_out, **wide), grad_out, needs)
        return [None if grad is None else grad.to(args.z.dtype) for grad in grads]
    grad_out = grad_out.contiguous()  # kept alive here: the struct holds its address
    struct, grads = backward_struct(args, grad_out, needs)
    extension().fv_accumulate_backward_cpu(struct, torch.get_num_threads())
    return grads


def advise_huge_pages(tensor: Tensor) -> None:
    """Asks for transparent huge pages on a large fresh CPU tensor before a kernel first writes it (csrc/cpu:
    advise_huge_pages; the kernels do so for the outputs they are handed, this is for buffers filled in parts)."""
    if IMPORT_ERROR is None and tensor.device.type == "cpu":
        extension().advise_huge_pages(tensor.data_ptr(), tensor.numel() * tensor.element_size())
