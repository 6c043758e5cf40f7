"""The one place that decides which backend runs: availability, "auto" resolution and launch."""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from fvkernels.ops import _extension
from fvkernels.ops.kernel_args import FVAccumulateArgs

BACKENDS = ("triton", "cuda", "cpp", "torch")
# What backend="auto" tries, in order, per device type (the first available one that supports the dtype, is auto's
# choice for it (AUTO_DTYPES) and, for a GPU kernel, passed its check on the device: fvkernels.ops.verification).
# The fastest measured first. On an NVIDIA H200 (bench/RESULTS.md, bench/GPU_PROFILE.md) the composite's cuBLAS
# GEMMs beat every float32 GPU kernel (0.32 ms of device time at T=784 × 16, against Triton's 2.1 ms with FMA dots,
# 0.48 with tf32x3, and the CUDA kernel's 0.40), while Triton's bfloat16 kernel took 0.04 ms: on a GPU auto takes
# Triton for 16-bit inputs and the composite otherwise; the CUDA kernel only when named.
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}
# The dtypes a backend is auto's choice for on a device type, where not all it supports (named, it takes them all).
AUTO_DTYPES = {("triton", "cuda"): (torch.float16, torch.bfloat16)}
_LAUNCHER_MODULES = {"triton": "fvkernels.ops.triton_fv", "cuda": "fvkernels.ops.cuda",
                     "cpp": "fvkernels.ops.cpp", "torch": "fvkernels.ops.reference"}


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.compiler.assume_constant_result  # traced code takes the answer, not the import
def _triton_import_error() -> Optional[str]:
    try:
        importlib.import_module("triton")
    except ImportError as error:
        return f"triton is not installed ({error}); pip install 'fvkernels[triton]' (Linux)"
    return None


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run on tensors of `device`, or None when it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} or 'auto'"
    if backend == "torch":
        return None
    if backend == "cpp":
        if _extension.IMPORT_ERROR is not None:
            return f"the C++ extension is not built ({_extension.IMPORT_ERROR}); {_extension.BUILD_HINT}"
        if device.type != "cpu":
            return f"the 'cpp' backend runs on CPU tensors, got {device}; use 'cuda' or 'triton' there"
        return None
    if backend == "cuda":
        if _extension.IMPORT_ERROR is not None:
            return f"the C++/CUDA extension is not built ({_extension.IMPORT_ERROR}); {_extension.BUILD_HINT}"
        if not _extension.extension().built_with_cuda:
            return f"the extension was built without the CUDA kernel; {_extension.BUILD_HINT}"
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, got {device}; use 'cpp' on the CPU"
        return None
    # triton
    reason = _triton_import_error()
    if reason is not None:
        return reason
    if device.type == "cpu" and not triton_interpreted():
        return ("the 'triton' backend runs on CUDA tensors; on CPU tensors only under the interpreter "
                "(set TRITON_INTERPRET=1 before importing fvkernels, for tests)")
    if device.type not in ("cpu", "cuda"):
        return f"the 'triton' backend runs on CUDA tensors, got {device}"
    return None


def available_backends() -> list:
    """Backends usable on this machine for some device, fastest first."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(unavailable_reason(b, d) is None for d in devices)]


def check_backend_name(backend) -> None:
    """Refuses a word that names no backend (ValueError: the caller's argument is wrong, whatever the machine)."""
    if not isinstance(backend, str) or backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {', '.join(BACKENDS)} "
                         "(fvkernels.available_backends() lists those this machine runs)")


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turns "auto" into a concrete backend for `device` (AUTO_ORDER); checks an explicit choice (never falls
    back): ValueError for an unknown name, RuntimeError for a backend this machine or device cannot run."""
    check_backend_name(backend)
    if backend == "auto":
        from fvkernels.ops.verification import trusted_for_auto  # it launches kernels through this module

        for candidate in AUTO_ORDER.get(device.type, ("torch",)):
            if (unavailable_reason(candidate, device) is None and supports_dtype(candidate, device, dtype)
                    and dtype in AUTO_DTYPES.get((candidate, device.type), (dtype,))
                    and trusted_for_auto(candidate, device, dtype)):
                return candidate
        return "torch"
    reason = unavailable_reason(backend, device)
    if reason is None and not supports_dtype(backend, device, dtype):
        reason = f"the {backend!r} backend does not support {dtype}; use backend='torch' for it"
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    return backend


def supports_dtype(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    if backend == "triton" and device.type == "cpu":  # the interpreter computes in numpy, which has no bfloat16
        return dtype in (torch.float32, torch.float16)
    if backend in ("triton", "cuda"):
        return dtype in (torch.float32, torch.float16, torch.bfloat16)
    return True


def launch(backend: str, args: FVAccumulateArgs) -> None:
    """Runs a resolved backend's launcher on a validated call."""
    importlib.import_module(_LAUNCHER_MODULES[backend]).launch(args)


def has_fused_backward(backend: str) -> bool:
    """Whether `backend` runs its own backward kernel (a launcher with `backward`, and, where it defines
    `backward_enabled`, enabled now); the others take the reference's GEMM-shaped torch code
    (reference.fv_accumulate_backward), which torch.compile can see into."""
    launcher = importlib.import_module(_LAUNCHER_MODULES[backend])
    return hasattr(launcher, "backward") and getattr(launcher, "backward_enabled", lambda: True)()


def launch_backward(backend: str, args: FVAccumulateArgs, grad_out: torch.Tensor, needs) -> list:
    """Runs a resolved backend's backward kernel (has_fused_backward) on a validated call."""
    return importlib.import_module(_LAUNCHER_MODULES[backend]).backward(args, grad_out, needs)
