"""Checks of tensor values (not shapes) that work both eagerly and under torch.compile / torch.export.

Eagerly a check reads one scalar back to the host and raises an exception that names what is wrong,
down to the offending indices, computed only on failure. While torch.compile or torch.export traces, a
host read would break the graph, so the same condition becomes torch._assert_async: it stays in the
graph and raises a RuntimeError carrying the message when the compiled code runs on bad values.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

MAX_NAMED_INDICES = 10


class NonFiniteError(ValueError):
    """A NaN or ±Inf where fvkernels needs finite values (a ValueError: the values passed in are wrong). Its own
    type, so that a caller holding more context (the training loop: the step, the sets' indices in the data) can
    say more: `finding` is what was found, without the advice that follows it in the message."""

    def __init__(self, message: str, finding: Optional[str] = None) -> None:
        super().__init__(message)
        self.finding = message if finding is None else finding


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
    if bool(torch.isfinite(values.sum(dtype=_accumulation_dtype(values)))):
        return []
    finite = torch.isfinite(values.reshape(values.shape[0], -1) if values.dim() else values.reshape(1, 1)).all(1)
    return (~finite).nonzero().flatten()[:MAX_NAMED_INDICES].tolist()


def check_finite(tensor: Tensor, describe: Callable[[Optional[List[int]]], str], *, offset: int = 0,
                 witness: Optional[Tensor] = None) -> None:
    """Refuses NaN or ±Inf in `tensor` with NonFiniteError(describe(indices)): the first offending indices along dim 0,
    numbered from `offset` (e.g. the first set of a chunk). While tracing, the in-graph assertion carries
    describe(None), as no index is known before the compiled code runs.

    witness: a smaller tensor that is not finite wherever `tensor` is not (the kernels' per-row sums of squares of
    their output), read instead of `tensor` eagerly: only when the witness is not finite (bad values, or an
    overflow of the witness alone) is `tensor` itself searched."""
    batched = torch._C._functorch.is_batchedtensor(tensor)
    tensor = unbatched(tensor)
    if tracing():
        torch._assert_async(torch.isfinite(tensor).all(), describe(None))
        return
    if witness is not None and all_finite([witness]):
        return
    bad = nonfinite_rows(tensor)
    if bad:  # under vmap dim 0 is not the caller's: no index is named then
        raise NonFiniteError(describe(None if batched else [index + offset for index in bad]))


def _accumulation_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype of a finiteness sum: bfloat16 sums in its own dtype (float32's range, and torch's bfloat16 sum
    accumulates in float32 internally at a tenth of the cost of an upcasting one); float16, whose range a sum
    of finite values leaves easily, in float32."""
    return tensor.dtype if tensor.dtype == torch.bfloat16 else torch.promote_types(tensor.dtype, torch.float32)


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every floating entry of every tensor is finite, eagerly, with one read from the device for all of
    them: a finite sum proves its terms finite (a sum that overflows is re-checked entry by entry)."""
    # detached one by one: cheaper than entering torch.no_grad (~20 µs a call on this project's CPU)
    floating = [unbatched(t).detach() for t in tensors if t is not None and t.is_floating_point() and t.numel()]
    if not floating:
        return True
    # On a GPU one fused kernel per dtype for the tensors' L1 norms (torch._foreach_norm), a handful of launches in
    # all; on the CPU, for float16 (whose range a norm leaves easily) and past 2^31 elements (where torch 2.6's
    # foreach norms faulted, pytorch#169930), a sum per tensor, which the CPU computes faster.
    fused = [t for t in floating if t.is_cuda and t.dtype != torch.float16 and t.numel() < 2 ** 31]
    fused_ids = {id(t) for t in fused}
    norms = [t.sum(dtype=_accumulation_dtype(t)) for t in floating if id(t) not in fused_ids]
    for dtype in dict.fromkeys(t.dtype for t in fused):
        norms += torch._foreach_norm([t for t in fused if t.dtype == dtype], 1)
    if len({norm.dtype for norm in norms}) > 1:
        norms = [norm.double() for norm in norms]
    if bool(torch.isfinite(torch.stack(norms)).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in floating)


def first_nonfinite(tensor: Tensor) -> Optional[Tuple[Tuple[int, ...], float, int]]:
    """(index, value, count) of the first NaN/±Inf entry of tensor and the number of such entries, or None; eager."""
    values = unbatched(tensor).detach()
    if not values.is_floating_point():
        return None
    bad = ~torch.isfinite(values)
    count = int(bad.sum())
    if not count:
        return None
    index = tuple(int(i) for i in bad.nonzero()[0]) if values.dim() else ()
    return index, float(values[index]), count


def check_finite_tensors(named: Dict[str, Optional[Tensor]], advice: str) -> None:
    """Refuses NaN or ±Inf in any of the named tensors: NonFiniteError naming the first such tensor, the value and its
    index, then `advice` (what to do). Eagerly one read from the device when all are finite; while tracing an
    in-graph assertion per tensor."""
    present = {name: t for name, t in named.items() if t is not None and t.is_floating_point()}
    if tracing():
        for name, tensor in present.items():
            torch._assert_async(torch.isfinite(unbatched(tensor)).all(), f"{name} holds NaN or Inf; {advice}")
        return
    if all_finite(list(present.values())):
        return
    for name, tensor in present.items():
        found = first_nonfinite(tensor)
        if found is not None:
            index, value, count = found
            where = f" at index {index[0] if len(index) == 1 else index}" if index else ""
            shown = "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
            finding = f"{name} holds {shown}{where} ({count} of {tensor.numel()} entries are NaN or Inf)"
            raise NonFiniteError(f"{finding}; {advice}", finding)


# ---- arguments -------------------------------------------------------------------------------------------------

def whole_number(name: str, value, minimum: int = 1) -> int:
    """value as an int when it is a whole number ≥ minimum (an int, a numpy integer or a float such as 16.0);
    otherwise ValueError naming the argument. A bool is refused: True is not a count."""
    whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, (bool, np.bool_)) or not whole or value < minimum:
        raise ValueError(f"{name} must be a whole number ≥ {minimum}, got {value!r}")
    return int(value)


def flag(name: str, value) -> bool:
    """value when it is True or False (or a numpy bool); otherwise TypeError: bool("False") is True, so a flag
    given as a string or a number is refused rather than guessed."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def real_number(name: str, value, *, minimum: Optional[float] = None, below: Optional[float] = None) -> float:
    """value as a float when it is a finite real number ≥ minimum and < below (each when given); otherwise
    TypeError (not a real number) or ValueError (out of range) naming the argument."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum) or (below is not None and value >= below):
        bounds = f" in [{minimum:g}, {below:g})" if minimum is not None and below is not None else \
            f" ≥ {minimum:g}" if minimum is not None else f" < {below:g}" if below is not None else ""
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")
    return value
