"""What the benchmarks measure besides pytest-benchmark's timings: the machine's ceilings, peak extra memory,
and agreement with the baseline."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

CEILING_REPEATS = 10
# Norm-wise error a provider may show against the float32 torch baseline: another summation order in float32,
# or the rounding of bfloat16 inputs.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def synchronized(fn: Callable[[], Tensor], device: str) -> Callable[[], Tensor]:
    """fn followed by a device synchronisation, so that wall-clock time covers the GPU work it queued."""
    if device != "cuda":
        return fn

    def run() -> Tensor:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def best_seconds(fn: Callable[[], object], device: str, repeats: int = CEILING_REPEATS) -> float:
    """The fastest of repeated calls: a ceiling is the best the machine does, and other load only slows it."""
    run = synchronized(fn, device)
    run()  # warm-up: thread pools, cuBLAS handles, first-touch of the outputs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def bf16_gemm_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    # oneDNN's bf16 GEMM needs AVX512-BF16 or AMX; without them torch emulates bf16, which is no ceiling.
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def measure_ceilings(device: str, full: bool) -> dict:
    """GEMM rates (GFLOP/s) of a square n³ product in fp32 and bf16, and copy bandwidth (GB/s, read + write)."""
    # A GPU needs a larger product to reach its rate and a copy well past its L2 (60 MB on an H200), timed by
    # wall clock around a synchronisation.
    size = (8192 if device == "cuda" else 2048) if full else 256
    copy_bytes = ((1024 if device == "cuda" else 256) if full else 8) << 20
    ceilings = {"gemm_size": size, "copy_bytes": copy_bytes}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        if dtype == torch.bfloat16 and not bf16_gemm_supported(device):
            continue
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        product = torch.empty_like(a)
        seconds = best_seconds(lambda: torch.mm(a, b, out=product), device)
        ceilings[f"gemm_gflops_{name}"] = 2 * size ** 3 / seconds / 1e9
    source = torch.ones(copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    ceilings["copy_gbps"] = 2 * copy_bytes / best_seconds(lambda: target.copy_(source), device) / 1e9
    if device == "cpu":
        ceilings.update(instruction_peaks())
    return ceilings


PEAK_SOURCE = Path(__file__).resolve().parent / "cpu_peak.cpp"


def instruction_peaks() -> dict:
    """The CPU's arithmetic peak on torch's thread count (GFLOP/s): fp32 FMA chains ("fma_gflops_float32") and, where
    the CPU has AVX512-BF16, vdpbf16ps chains ("dot_gflops_bfloat16"), from bench/cpu_peak.cpp compiled here. A
    library GEMM may sit well below them; nothing can sit above. Empty where it cannot be built (no C++ compiler,
    not x86-64)."""
    compiler = shlex.split(os.environ["CXX"]) if os.environ.get("CXX") else [shutil.which("c++") or shutil.which("g++")]
    if compiler[0] is None:
        return {}
    try:
        # Built in a private folder each time (about a second): nothing another user left in a shared temp folder
        # is ever run.
        with tempfile.TemporaryDirectory(prefix="fvkernels-cpu-peak-") as folder:
            binary = Path(folder) / "cpu_peak"
            subprocess.run([*compiler, "-O2", "-fopenmp", str(PEAK_SOURCE), "-o", str(binary)], check=True,
                           capture_output=True, timeout=120)
            probe = subprocess.run([str(binary)], check=True, capture_output=True, text=True, timeout=120,
                                   env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    except (OSError, subprocess.SubprocessError):
        return {}
    return json.loads(probe.stdout)


def peak_extra_bytes(fn: Callable[[], Tensor], device: str, allocates_output: bool = True) -> Optional[int]:
    """Peak memory fn allocates beyond its inputs (allocated before) and its output, in bytes
    (allocates_output=False: fn writes into a buffer that exists before the call).

    On CPU: the peak of the running sum of the allocations and frees torch.profiler records; on GPU: the CUDA
    caching allocator's peak. Memory that bypasses torch's allocators (a library's own malloc) is not seen.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before - allocates_output * out.numel() * out.element_size()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    # Each allocation and free is a "[memory]" event with a signed byte count; the public FunctionEvent list
    # folds those inside an operator into the operator's net usage, which hides peaks within it.
    changes = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                     if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in changes:
        running += nbytes
        peak = max(peak, running)
    return peak - allocates_output * out.numel() * out.element_size()


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖₂ / ‖expected‖₂, so that entries near zero do not blow it up."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
