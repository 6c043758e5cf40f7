"""The CUDA kernel's source, run on the CPU: tests/cuda_emulator/ compiles csrc/cuda/fv_accumulate_cuda.cu with g++
against stand-in CUDA headers in which every GPU thread is a fiber and __syncthreads/shuffles are scheduler
barriers (a deadlock, a barrier in divergent code or a race shows as a failure or as results that change with
the thread schedule), buffers sit against guard pages and shared memory is poisoned. The harness checks hand-
picked and random problems (every dtype, tile size, split-T, the epilogue options) against a float64 loop, and the
backward kernels on every case with d ≤ 256 (every gradient, poisoned first, three thread orders bit-identical).

No GPU runs here, so this is what executes the CUDA kernel in CI; real-hardware speed and memory-model
behaviour are checked by tests/test_fv_accumulate.py::test_gpu_backends on a GPU machine.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMULATOR = ROOT / "tests" / "cuda_emulator"


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None,
                    reason="the emulator needs g++ and Linux ucontext fibers")
def test_cuda_kernel_on_the_emulator(tmp_path):
    binary = tmp_path / "harness"
    compile_command = ["g++", "-std=c++17", "-O2", "-Wno-unknown-pragmas", "-Wno-missing-field-initializers",
                       f"-I{EMULATOR}", f"-I{ROOT / 'csrc'}", str(EMULATOR / "harness.cpp"), "-o", str(binary)]
    subprocess.run(compile_command, check=True, capture_output=True, text=True)
    for guard in ([], ["before"]):  # guard pages after the buffers, then before them
        run = subprocess.run([str(binary), *guard], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0 and "PASSED: 0 failure(s)" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
