"""Everything fvkernels claims about a GPU, checked in one command on a machine with one:

    python bench/gpu_check.py          (or: make gpu-check)

1. builds the extension with the CUDA kernel for this card (CMake, straight into fvkernels/; FVK_CMAKE_ARGS adds
   configure options);
2. runs the GPU tests (`pytest tests -m gpu`: Triton and CUDA kernels against the float64 reference over odd
   shapes and dtypes, gradients, CUDA autocast, the baselines on the GPU) and `fvkernels selftest`;
3. profiles one call per GPU provider (bench/gpu_profile.py: wall, device and kernel time, the largest kernels);
4. runs the GPU benchmarks (`pytest bench/ --benchmark -k cuda`: triton, cuda, eager and torch.compile; the card's
   GEMM rate and copy bandwidth measured in the same process) and writes bench/RESULTS.md from the newest CPU run
   and this GPU run together.
Sized for about 7 minutes on one H100/H200 (torch.compile in its default mode, not max-autotune, to fit; the tests
spread over processes with pytest-xdist where it is installed, since compiling Triton kernels is most of their time).
Without a CUDA device it says so and exits 0 having done nothing. A failed build does not stop the check: the Triton
kernels need no extension, and the CUDA backend's tests and benchmarks then skip saying why. Each step's output goes
to the terminal; the exit status is the first failing step's.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
# Seconds each step may take. Measured on an H200 (2026-12-04): build 27 s, tests 92 s, selftest 60 s (Triton then
# autotuned each checked shape; the checks now take the first viable config), profile about 90 s, benchmarks 141 s:
# about 7 minutes in all.
BUILD_LIMIT, TEST_LIMIT, SELFTEST_LIMIT, PROFILE_LIMIT, BENCH_LIMIT, REPORT_LIMIT = 150, 150, 120, 150, 240, 30


def cuda_device() -> str | None:
    """The card's name and compute capability, or None without a usable CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"


def pybind11_cmake_dir() -> str:
    try:
        import pybind11
    except ImportError:
        if os.environ.get("PYBIND11_DIR"):
            return os.environ["PYBIND11_DIR"]
        raise SystemExit("gpu_check: pybind11 is needed to build the extension: pip install pybind11, or set "
                         "PYBIND11_DIR to its CMake folder (python -c 'import pybind11; print(pybind11.get_cmake_dir())' "
                         "on a machine that has it)") from None
    return pybind11.get_cmake_dir()


def test_processes() -> list:
    """pytest-xdist's options for one test process per two cores (at most 8), where it is installed."""
    workers = min(8, (os.cpu_count() or 1) // 2)
    return ["-n", str(workers)] if workers > 1 and importlib.util.find_spec("xdist") else []


def run_step(name: str, command: list, limit: int, **options) -> int:
    print(f"\n=== {name}: {' '.join(map(str, command))} (limit {limit} s)", flush=True)
    start = time.monotonic()
    # A process group of its own, so that a step stopped at its limit takes its test workers and compile
    # processes with it instead of leaving them on the GPU during the next step.
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, **options)
    try:
        status = process.wait(timeout=limit)
    except BaseException as stopped:  # the limit, or Ctrl-C (which the step's own session does not receive)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if not isinstance(stopped, subprocess.TimeoutExpired):
            raise
        print(f"=== {name}: stopped after {limit} s", flush=True)
        return 124
    print(f"=== {name}: exit {status} after {time.monotonic() - start:.0f} s", flush=True)
    return status


def build_commands(build_dir: Path) -> list:
    import torch

    major, minor = torch.cuda.get_device_capability()
    generator = ["-GNinja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), *generator, "-DCMAKE_BUILD_TYPE=Release",
                 "-DFVK_CUDA=ON", f"-DFVK_CUDA_ARCHITECTURES={major}{minor}", f"-DPython_EXECUTABLE={sys.executable}",
                 f"-Dpybind11_DIR={pybind11_cmake_dir()}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ROOT / 'fvkernels'}",
                 *shlex.split(os.environ.get("FVK_CMAKE_ARGS", ""))]  # e.g. -DPython_INCLUDE_DIR=... for headers elsewhere
    return [configure, ["cmake", "--build", str(build_dir), f"-j{os.cpu_count() or 1}"]]


def main() -> int:
    device = cuda_device()
    if device is None:
        print("gpu_check: no CUDA device on this machine; nothing to check (run it where `nvidia-smi` shows a GPU)")
        return 0
    print(f"gpu_check on {device}")
    started = time.monotonic()
    # The GPU kernels run on the GPU, not in Triton's interpreter (tests/conftest.py turns it on by default).
    env = dict(os.environ, TRITON_INTERPRET="0", FVK_BENCH_COMPILE_MODE="default")
    build_dir = ROOT / "build" / "gpu-cmake"
    failed = 0
    for command in build_commands(build_dir):
        failed = run_step("build", command, BUILD_LIMIT, env=env)
        if failed:
            break
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    gpu_json = RESULTS_DIR / f"{stamp}-gpu.json"
    RESULTS_DIR.mkdir(exist_ok=True)
    steps = [
        ("GPU tests", [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                       "--durations=10", *test_processes()], TEST_LIMIT),
        ("selftest", [sys.executable, "-m", "fvkernels", "selftest"], SELFTEST_LIMIT),
        ("GPU profile", [sys.executable, str(ROOT / "bench" / "gpu_profile.py")], PROFILE_LIMIT),
        ("GPU benchmarks", [sys.executable, "-m", "pytest", "bench", "--benchmark", "-k", "cuda", "-p",
                            "no:cacheprovider", "--benchmark-max-time=0.5", f"--benchmark-json={gpu_json}"], BENCH_LIMIT),
        # report.py's default: the newest CPU run and the newest GPU run, this one
        ("report", [sys.executable, str(ROOT / "bench" / "report.py"),
                    "--note", f"GPU run by bench/gpu_check.py on {device}"], REPORT_LIMIT),
    ]
    for name, command, limit in steps:
        if name == "report" and not gpu_json.exists():
            print("=== report: skipped, the benchmarks saved no JSON")
            continue
        status = run_step(name, command, limit, env=env)
        failed = failed or status
    print(f"\ngpu_check: {'failed (exit ' + str(failed) + ')' if failed else 'passed'} in "
          f"{time.monotonic() - started:.0f} s; results in bench/RESULTS.md and {gpu_json.name}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
