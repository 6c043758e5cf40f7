"""Checks of tensor values (not shapes) that work both eagerly and under torch.compile / torch.export.

Eagerly a check reads one scalar back to the host and raises an exception that names what is wrong,
down to the offending indices, computed only on failure. While torch.compile or torch.export traces, a
host read would break the graph, so the same condition becomes torch._assert_async: it stays in the
graph and raises a RuntimeError carrying the message when the compiled code runs on bad values.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor

MAX_NAMED_INDICES = 10


def tracing() -> bool:
    """True while torch.compile or torch.export traces the calling code (no host reads then)."""
    return torch.compiler.is_compiling()


def transformed() -> bool:
    """True inside a torch.func transform (vmap, grad, …): code must stay functional there (no out= buffers)."""
    return torch._C._functorch.maybe_current_level() is not None


def unbatched(tensor: Tensor) -> Tensor:
    """Under torch.func.vmap, the tensor of every batch entry at once: vmap refuses to read a batched tensor's
    values (and has no rule for _assert_async), and a check over all entries is the check asked for."""
    while torch._C._functorch.is_batchedtensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor


def require(condition: Tensor, message: str, *, details: Optional[Callable[[], str]] = None,
            error: type = ValueError) -> None:
    """Raises error(message) unless every element of the boolean tensor `condition` is true. details(),
    called only on failure and only eagerly, is appended to the message (e.g. ", got values in [-1, 9]")."""
    condition = unbatched(condition)
    if tracing():
        torch._assert_async(condition.all(), message)
        return
    if not bool(condition.all()):
        raise error(message if details is None else message + details())


def nonfinite_rows(tensor: Tensor) -> List[int]:
    """Indices along dim 0 of the rows holding NaN or ±Inf (at most MAX_NAMED_INDICES); eager only.

    NaN and ±Inf survive a sum, so a finite sum proves every entry finite without a mask as large as
    the tensor; only a sum that is not finite (bad data, or an overflow of the sum) pays for the mask."""
    values = tensor.detach()
    if values.numel() == 0 or not values.dtype.is_floating_point:
        return []
    if bool(torch.isfinite(values.sum(dtype=torch.promote_types(values.dtype, torch.float32)))):
        return []
    finite = torch.isfinite(values.reshape(values.shape[0], -1) if values.dim() else values.reshape(1, 1)).all(1)
    return (~finite).nonzero().flatten()[:MAX_NAMED_INDICES].tolist()


def check_finite(tensor: Tensor, describe: Callable[[Optional[List[int]]], str], *, offset: int = 0) -> None:
    """Refuses NaN or ±Inf in `tensor` with ValueError(describe(indices)): the first offending indices along dim 0,
    numbered from `offset` (e.g. the first set of a chunk). While tracing, the in-graph assertion carries
    describe(None), as no index is known before the compiled code runs."""
    batched = torch._C._functorch.is_batchedtensor(tensor)
    tensor = unbatched(tensor)
    if tracing():
        torch._assert_async(torch.isfinite(tensor).all(), describe(None))
        return
    bad = nonfinite_rows(tensor)
    if bad:  # under vmap dim 0 is not the caller's: no index is named then
        raise ValueError(describe(None if batched else [index + offset for index in bad]))
