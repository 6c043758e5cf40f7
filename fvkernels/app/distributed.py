"""Joining a torchrun job: one process of `torchrun … -m fvkernels train|extract` and its device.

The collectives the job's processes then make are fvkernels.common.collectives; the data-parallel training
loop is `fvkernels.training.train(..., distributed=True)`, the sharded extraction
`fvkernels.app.extract.extract(..., distributed=True)`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed as dist


def init_from_env(backend: Optional[str] = None) -> bool:
    """Joins the job that torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) with backend nccl when CUDA is available, else gloo. Returns True in a
    job of several processes, False when run as one plain process (nothing is initialised then)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank())  # before any collective: NCCL binds the current device
        dist.init_process_group(backend)
    return True


@contextmanager
def leaving_at_exit(distributed: bool) -> Iterator[None]:
    """The block is this process's part of the job; the process group is destroyed when it ends. After a
    normal end every process first waits for the others, since gloo aborts a process (std::terminate)
    whose peer tears the group down while it is still at work (process 0 writing the checkpoint, say).
    After an error none waits: an error raised on one process alone would leave the others blocked."""
    try:
        yield
        if distributed:
            dist.barrier()
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_device(distributed: bool) -> torch.device:
    """The GPU of this process (cuda:LOCAL_RANK) when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank() if distributed else torch.cuda.current_device())
