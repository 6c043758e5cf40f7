"""Kept for earlier import paths: joining a torchrun job lives in fvkernels.app.distributed, the collectives in
fvkernels.common.collectives."""
from fvkernels.app.distributed import default_device, init_from_env, leaving_at_exit, local_rank
from fvkernels.common.collectives import barrier, gather_rows, on_main, rank_and_size, sum_over_processes

__all__ = ["barrier", "default_device", "gather_rows", "init_from_env", "leaving_at_exit", "local_rank", "on_main",
           "rank_and_size", "sum_over_processes"]
