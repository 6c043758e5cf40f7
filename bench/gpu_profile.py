"""Where a GPU call's time goes, per provider: the wall time of a call, the time of the device kernels it launched
(torch.profiler), and the kernels that take it — what a benchmark's one number cannot say.

    python bench/gpu_profile.py [--cases images frames-c512 train-t196 pipeline-images] [--calls 20]

For every case and GPU provider of bench/providers.py: median wall time per call (synchronised), device time per
call and its three largest kernels, and for fv_accumulate also the kernel alone (dispatch.launch into a kept buffer,
no argument checks, timed with CUDA events). The Triton float32 kernel is also timed with each tl.dot precision
("ieee"; "tf32x3", the default; "tf32") next to its error against float64. bench/gpu_check.py runs it; without a CUDA
device it says so and exits 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict

import torch

if __package__ in (None, ""):  # run as a script: the repository root on the path, as pytest's pythonpath gives it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fvkernels.ops import dispatch, triton_fv
from fvkernels.ops.kernel_args import FVAccumulateArgs
from fvkernels.ops.reference import fv_accumulate_reference

from bench.cases import FV_ACCUMULATE_CASES, PIPELINE_CASE, TRAINING_CASES, fv_accumulate_inputs, pipeline_inputs
from bench.measure import relative_error
from bench.providers import COMPILE, PROVIDERS, Provider, fv_accumulate_fn, pipeline_fn, training_step_fn

CASES = {case.key: case for case in (*FV_ACCUMULATE_CASES, *TRAINING_CASES, PIPELINE_CASE)}
DEFAULT_CASES = ("images", "frames-c512", "train-t196", "pipeline-images")
PRECISIONS = ("ieee", "tf32x3", "tf32")
# Besides the benchmarks' providers: the composite through fvkernels' own entry point (its checks included), which
# tells a kernel's cost from the entry point's.
PROFILED = (*PROVIDERS, Provider("fvkernels-torch", "cuda", "torch"))


def wall_ms(fn: Callable[[], object], calls: int) -> float:
    """Median wall time of a synchronised call, after three untimed ones (compilation, autotuning)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def event_ms(fn: Callable[[], object], calls: int) -> float:
    """Median device time between CUDA events around one call, after three untimed ones."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def device_kernels(fn: Callable[[], object], calls: int) -> Dict[str, float]:
    """Device time per call (ms) of each kernel `calls` calls of fn launched, largest first."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: Dict[str, float] = {}
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.device_time / 1e3 / calls
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


@contextmanager
def forward_fp32_precision(precision: str):
    """The Triton forward kernel's float32 tl.dot precision for the duration (a constexpr of the launch)."""
    chosen = triton_fv.FORWARD_FP32_PRECISION
    triton_fv.FORWARD_FP32_PRECISION = precision
    try:
        yield
    finally:
        triton_fv.FORWARD_FP32_PRECISION = chosen


def kernel_alone(provider, inputs) -> Callable[[], object]:
    """The backend's launch into a kept output: the kernels without the public entry point's checks."""
    z, x, w, b, s, f, lengths = inputs
    out = z.new_empty((z.shape[0], x.shape[2], z.shape[2] + 1))
    row_sumsq = torch.empty((z.shape[0], x.shape[2]), dtype=torch.float32, device=z.device)
    args = FVAccumulateArgs(z, x, w, b, s, f, lengths, out, row_sumsq=row_sumsq)
    return lambda: dispatch.launch(provider.implementation, args)


def profile_case(case, calls: int) -> None:
    lines = [f"\n## {case.group}",
             "| provider | wall ms | device ms | kernel alone ms | largest kernels (ms per call) |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for provider in PROFILED:
        # torch.compile's is left out: its compilation would take most of the few minutes this is run in
        if (provider.device != "cuda" or provider.reuse_output or provider.implementation == COMPILE
                or provider.unavailable_reason() is not None):
            continue
        if case.operation == "fv_vae_encode":
            descriptors, params = pipeline_inputs(case, "cuda", provider.dtype)
            encode = pipeline_fn(provider, params, True)
            fn = lambda: encode(descriptors)  # noqa: E731
        else:
            inputs = fv_accumulate_inputs(case, "cuda", provider.dtype)
            if case.operation == "fv_accumulate_train":
                generator = torch.Generator().manual_seed(1)
                grad_out = torch.randn(case.sets, case.channels, case.latent + 1, generator=generator)
                step = training_step_fn(provider, True)
                grad_out = grad_out.to(inputs[0].device, provider.dtype)
                fn = lambda: step(*inputs, grad_out)  # noqa: E731
            else:
                encode = fv_accumulate_fn(provider, True)
                fn = lambda: encode(*inputs)  # noqa: E731
        name = f"{provider.name} ({str(provider.dtype).replace('torch.', '')})"
        try:
            alone = "—"
            if case.operation == "fv_accumulate" and provider.implementation in dispatch.BACKENDS:
                alone = f"{event_ms(kernel_alone(provider, inputs), calls):.3f}"
            kernels = device_kernels(fn, 5)
            largest = "; ".join(f"{kernel[:48]} {ms:.3f}" for kernel, ms in list(kernels.items())[:3])
            lines.append(f"| {name} | {wall_ms(fn, calls):.3f} | {sum(kernels.values()):.3f} | {alone} | {largest} |")
        except Exception as error:  # one provider's failure is a finding; the others are still measured
            lines.append(f"| {name} | failed: {type(error).__name__}: {str(error).splitlines()[0][:150]} | | | |")
        print(lines[-1], flush=True)


def precision_lines(case, calls: int) -> None:
    """The Triton float32 kernel alone with each tl.dot precision, and its error against float64."""
    inputs = fv_accumulate_inputs(case, "cuda", torch.float32)
    expected = fv_accumulate_reference(*[t.double() if t is not None and t.is_floating_point() else t
                                         for t in inputs])
    triton_provider = next(p for p in PROVIDERS if p.device == "cuda" and p.implementation == "triton"
                           and p.dtype == torch.float32)
    lines = [f"\n## Triton float32, tl.dot precision: {case.group}",
             "| precision | kernel alone ms | error vs float64 |", "|---|---|---|"]
    print("\n".join(lines), flush=True)
    for precision in PRECISIONS:
        try:
            with forward_fp32_precision(precision):
                milliseconds = event_ms(kernel_alone(triton_provider, inputs), calls)
                got = fv_accumulate_fn(triton_provider, True)(*inputs)
            lines.append(f"| {precision} | {milliseconds:.3f} | {relative_error(got.double(), expected):.2e} |")
        except Exception as error:
            lines.append(f"| {precision} | failed: {type(error).__name__}: {str(error).splitlines()[0][:150]} | |")
        print(lines[-1], flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES), choices=sorted(CASES))
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device on this machine; nothing to profile")
        return 0
    print(f"# GPU profile on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for key in args.cases:  # each table printed as it is measured
        profile_case(CASES[key], args.calls)
    if dispatch.unavailable_reason("triton", torch.device("cuda")) is None:
        precision_lines(CASES["images"], args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
