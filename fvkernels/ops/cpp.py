"""The "cpp" backend: the fused CPU kernel of csrc/cpu, called through the compiled module."""
from __future__ import annotations

import torch

from fvkernels.ops._extension import extension, kernel_struct
from fvkernels.ops.kernel_args import FVAccumulateArgs


def launch(args: FVAccumulateArgs) -> None:
    if args.z.dtype in (torch.float16, torch.bfloat16):
        # The CPU kernel computes in float32 or float64; half inputs are widened here (small next to the GEMMs).
        wide = {name: tensor.float() for name, tensor in args.float_inputs().items()}
        out_wide = torch.empty(args.out.shape, dtype=torch.float32)
        launch(args.replace(out=out_wide, **wide))
        args.out.copy_(out_wide)
        return
    extension().fv_accumulate_cpu(kernel_struct(args), torch.get_num_threads())
