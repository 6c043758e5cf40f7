"""The few torch.distributed collectives fvkernels uses (the layer's statistics, training, extraction).

Every function takes `distributed`: True in a process of a multi-process job (fvkernels.app.distributed
joins one), where every process must make the same calls in the same order; False for a single process,
where they reduce to the obvious local result.
"""
from __future__ import annotations

from typing import Callable, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

Result = TypeVar("Result")


def rank_and_size(distributed: bool) -> Tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) for a single process."""
    if not distributed:
        return 0, 1
    if not dist.is_initialized():
        raise RuntimeError("distributed=True but torch.distributed is not initialised; launch with torchrun and "
                           "call fvkernels.app.distributed.init_from_env() first")
    return dist.get_rank(), dist.get_world_size()


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
