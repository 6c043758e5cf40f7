"""The "cuda" backend: the fused CUDA kernel of csrc/cuda, enqueued on torch's current stream."""
from __future__ import annotations

import torch

from fvkernels.ops._extension import extension, kernel_struct
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
