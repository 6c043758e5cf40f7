"""Several processes on torch.distributed: joining a torchrun job, and the few collectives fvkernels uses.

Every function takes `distributed`: True in a process of a multi-process job (after `init_from_env()`),
where every process must make the same calls in the same order; False for a single process, where they
reduce to the obvious local result. The data-parallel training loop is `fvkernels.train.train(...,
distributed=True)`, the sharded extraction `fvkernels.extract.extract(..., distributed=True)`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

Result = TypeVar("Result")


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


def rank_and_size(distributed: bool) -> Tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) for a single process."""
    if not distributed:
        return 0, 1
    if not dist.is_initialized():
        raise RuntimeError("distributed=True but torch.distributed is not initialised; launch with torchrun and "
                           "call fvkernels.distributed.init_from_env() first")
    return dist.get_rank(), dist.get_world_size()


def default_device(distributed: bool) -> torch.device:
    """The GPU of this process (cuda:LOCAL_RANK) when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank() if distributed else torch.cuda.current_device())


def sum_over_processes(values: Tensor, distributed: bool) -> Tensor:
    """values summed in place over all processes when distributed, else unchanged."""
    if distributed:
        dist.all_reduce(values)
    return values


def gather_rows(local: Tensor, distributed: bool) -> Tensor:
    """The processes' (n_rank, …) tensors concatenated along dim 0 in rank order, on every process.
    Row counts may differ between processes (all_gather itself needs equal shapes, so rows are padded)."""
    if not distributed:
        return local
    _, size = rank_and_size(True)
    counts = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=local.device))
    counts = [int(count) for count in counts]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def on_main(compute: Callable[[], Result], distributed: bool) -> Result:
    """compute() run by process 0 alone, its result handed to every process; an exception it raises is
    raised on every process (so none is left waiting in a later collective). Also a barrier."""
    rank, _ = rank_and_size(distributed)
    outcome = [None, None]
    if rank == 0:
        try:
            outcome[0] = compute()
        except Exception as error:  # re-raised below, after the others have been told
            outcome[1] = error
    if distributed:
        dist.broadcast_object_list(outcome, src=0)
    result, error = outcome
    if error is not None:
        raise error
    return result


def barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()
