"""Backends checked against the float64 reference on the machine at hand: the self-test of every backend on every
device (`fvkernels selftest`), and the one check `backend="auto"` makes before it trusts a GPU kernel.

A check runs the whole kernel contract (ragged lengths with an empty set, the prenorm scale, the Fisher scaling, the
signed square root, the row sums of squares) on small problems of odd sizes, and compares signed squares
sign(v)·v² (the square root turns a rounding error δ near 0 into √δ). Tolerances: 1e-12 in float64, 1e-5 in
float32 (the kernels' contract), and for float16/bfloat16 twice the torch backend's own error at that precision
plus 1e-3 (flash-attention's rule).
"""
from __future__ import annotations

import contextlib
import os
import platform
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily

from fvkernels.common.checks import tracing
from fvkernels.ops import dispatch
from fvkernels.ops.kernel_args import FVAccumulateArgs
from fvkernels.ops.reference import fv_accumulate_outputs

# (N, T, C, d): channel blocks, T-blocks and d-tiles all end in partial tiles; the first is the auto check's
CHECK_SHAPES = ((3, 37, 19, 11), (4, 130, 33, 70), (2, 5, 3, 1))
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
CONTRACT_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
LOW_PRECISION_ATOL = 1e-3
# Kernels `backend="auto"` runs only after they passed a check on the device: they have not run on real hardware.
CHECKED_BEFORE_AUTO_USE = ("triton", "cuda")
# FVK_TRUST_GPU_KERNELS=1: auto uses them unchecked (saves the check's milliseconds at the first call).
TRUST_VARIABLE = "FVK_TRUST_GPU_KERNELS"


def _problem(shape: Tuple[int, int, int, int], device: torch.device):
    generator = torch.Generator().manual_seed(sum(shape))
    num_sets, set_size, channels, latent = shape

    def random(*size):
        return torch.rand(*size, generator=generator, dtype=torch.float64)
    z = torch.randn(num_sets, set_size, latent, generator=generator, dtype=torch.float64)
    tensors = dict(z=z, x=random(num_sets, set_size, channels), dec_weight=torch.randn(
        channels, latent, generator=generator, dtype=torch.float64) / latent ** 0.5,
        dec_bias=random(channels) - 0.5, inv_sigma2=random(channels) + 0.5, fisher_rsqrt=random(channels, latent + 1) + 0.5,
        x_scale=random(num_sets, set_size) + 0.5)
    lengths = torch.randint(0, set_size + 1, (num_sets,), generator=generator)
    lengths[0], lengths[-1] = set_size, 0  # a full set and an empty one
    return {name: value.to(device) for name, value in tensors.items()}, lengths.to(device)


def _signed_square(values: Tensor) -> Tensor:
    values = values.double()
    return values * values.abs()


def _untuned(backend: str):
    """The Triton launcher's first-viable-config mode for a check (triton_fv.untuned); nothing for other backends."""
    if backend != "triton":
        return contextlib.nullcontext()
    from fvkernels.ops.triton_fv import untuned  # imports triton, which the other backends do not need

    return untuned()


def kernel_errors(backend: str, device: torch.device, dtype: torch.dtype, shape=CHECK_SHAPES[0]) -> Tuple[float, float]:
    """Norm-wise relative errors (max |ours − reference| / max |reference|) of the backend's output and of its
    float32 row sums of squares, on one problem of `shape` (N, T, C, d), against the float64 reference."""
    tensors, lengths = _problem(shape, device)
    expected, expected_sums = fv_accumulate_outputs(**tensors, lengths=lengths, signed_sqrt=True, with_row_sumsq=True)
    num_sets, _, channels, latent = shape
    out = torch.full((num_sets, channels, latent + 1), float("nan"), dtype=dtype, device=device)
    row_sumsq = torch.full((num_sets, channels), float("nan"), dtype=torch.float32, device=device)
    cast = {name: value.to(dtype) for name, value in tensors.items()}
    x_scale = cast.pop("x_scale")
    with _untuned(backend):
        dispatch.launch(backend, FVAccumulateArgs(**cast, lengths=lengths, out=out, x_scale=x_scale,
                                                  signed_sqrt=True, row_sumsq=row_sumsq))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    def error(got, want):
        return float(((_signed_square(got) - _signed_square(want)).abs().max() / _signed_square(want).abs().max())
                     .nan_to_num(float("inf")))
    return error(out, expected), error(row_sumsq, expected_sums)


def tolerances(device: torch.device, dtype: torch.dtype, shape=CHECK_SHAPES[0]) -> Tuple[float, float]:
    """What kernel_errors may be: the output's, and the row sums' (float32 whatever the dtype)."""
    if dtype in CONTRACT_TOLERANCE:
        return CONTRACT_TOLERANCE[dtype], max(CONTRACT_TOLERANCE[dtype], CONTRACT_TOLERANCE[torch.float32])
    out_error, sums_error = kernel_errors("torch", device, dtype, shape)
    out_tolerance = 2 * out_error + LOW_PRECISION_ATOL
    # The row sums add up squares of the stored outputs: they may be off as far as the outputs may. The composite's
    # own row-sum error on one small problem can be a lucky low (measured over 20 problems in bfloat16: the cpp
    # kernel's median 7.5·10⁻³, the composite's 6.2·10⁻³, their worst 1.4·10⁻² and 1.9·10⁻²).
    return out_tolerance, max(2 * sums_error + LOW_PRECISION_ATOL, out_tolerance)


def within(errors: Tuple[float, float], limits: Tuple[float, float]) -> bool:
    return all(error <= limit for error, limit in zip(errors, limits))


# ---- the check before auto uses a GPU kernel -------------------------------------------------------------

_VERDICTS: Dict[Tuple[str, str, torch.dtype], bool] = {}


def trusted_for_auto(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `backend="auto"` may use this backend for (device, dtype): kernels not yet run on real hardware
    first pass a check against the reference, once per (device, dtype) in the process. A failure warns once,
    naming the kernel and its error; auto then takes the next backend. torch.compile and torch.export run the check
    while they trace, outside the graph, and keep its answer; during CUDA graph capture, where it cannot run, a
    kernel not checked before is not used."""
    if backend not in CHECKED_BEFORE_AUTO_USE or os.environ.get(TRUST_VARIABLE, "0") not in ("", "0"):
        return True
    # Dynamo cannot trace the capture query (a torch.* call returning a bool); a traced call is not being captured.
    if device.type == "cuda" and not tracing() and torch.cuda.is_current_stream_capturing():
        return _VERDICTS.get((backend, str(device), dtype), False)
    return _checked(backend, str(device), dtype)


@torch.compiler.assume_constant_result  # traced code takes the verdict as a constant; the check runs eagerly
def _checked(backend: str, device_name: str, dtype: torch.dtype) -> bool:
    key = (backend, device_name, dtype)
    if key not in _VERDICTS:
        device = torch.device(device_name)
        with unset_fake_temporarily():  # torch.export traces with fake tensors; the check needs real ones
            errors, limits = kernel_errors(backend, device, dtype), tolerances(device, dtype)
        _VERDICTS[key] = within(errors, limits)
        if not _VERDICTS[key]:
            warnings.warn(f"fvkernels: the {backend!r} kernel failed its check on {device} in {dtype} (relative errors "
                          f"{errors[0]:.2e} of the output, {errors[1]:.2e} of the row sums, allowed {limits[0]:.1e} and "
                          f"{limits[1]:.1e} against the float64 reference); backend='auto' uses the next "
                          f"backend instead. Run `fvkernels selftest` for every backend and dtype, set "
                          f"{TRUST_VARIABLE}=1 to skip the check", RuntimeWarning, stacklevel=5)
    return _VERDICTS[key]


def forget_verdicts() -> None:
    """Clears the checks' results (the next auto call checks again), e.g. after a kernel changed in a test."""
    _VERDICTS.clear()


# ---- the self-test ---------------------------------------------------------------------------------------

@dataclass
class SelfTestResult:
    backend: str
    device: str  # the device's name, e.g. "NVIDIA H200" or the CPU model
    dtype: str
    error: float  # the output's, the worst over the shapes
    row_sums_error: float
    tolerance: float
    row_sums_tolerance: float
    seconds: float  # all shapes, first calls (compilation, autotuning) included

    @property
    def passed(self) -> bool:
        return within((self.error, self.row_sums_error), (self.tolerance, self.row_sums_tolerance))


@lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def devices() -> List[torch.device]:
    return [torch.device("cpu")] + [torch.device("cuda", index) for index in range(torch.cuda.device_count())]


def selftest(dtypes: Optional[Sequence[torch.dtype]] = None, shapes=CHECK_SHAPES) -> List[SelfTestResult]:
    """Every backend that runs here, on each device of the machine and each dtype it supports, against the
    float64 reference over `shapes`: one result per (backend, device, dtype)."""
    results = []
    for device in devices():
        for backend in dispatch.BACKENDS:
            if dispatch.unavailable_reason(backend, device) is not None:
                continue
            for dtype in dtypes or DTYPES:
                if not dispatch.supports_dtype(backend, device, dtype):
                    continue
                start = time.perf_counter()
                errors = [kernel_errors(backend, device, dtype, shape) for shape in shapes]
                seconds = time.perf_counter() - start
                limits = [tolerances(device, dtype, shape) for shape in shapes]
                # the shape closest to (or furthest past) its tolerance speaks for all
                (error, sums_error), (limit, sums_limit) = max(
                    zip(errors, limits), key=lambda pair: max(e / l for e, l in zip(*pair)))
                results.append(SelfTestResult(backend, device_name(device), str(dtype).replace("torch.", ""),
                                              error, sums_error, limit, sums_limit, seconds))
    return results
