"""Ahead-of-time compile of every Triton kernel specialization for sm_90 and sm_80 (no GPU needed).

Runs `python -m fvkernels.ops.triton_aot` as a user would, outside the interpreter, and requires every
compile to succeed within the target's shared memory and without heavy spills. It takes a few minutes
on two cores: deselect with `-m "not slow"` for a quick run.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

REPO_ROOT = Path(__file__).resolve().parents[1]


def nvidia_backend_available() -> bool:
    from triton.backends import backends
    return "nvidia" in backends


@pytest.mark.slow
@pytest.mark.skipif(not nvidia_backend_available(), reason="this triton build has no NVIDIA backend to compile for")
def test_every_specialization_compiles_within_resources():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "-m", "fvkernels.ops.triton_aot"], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=1200)
    report = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"triton_aot failed (exit {completed.returncode}):\n{report[-6000:]}"
    compiled_kernels = {line.split()[0] for line in completed.stdout.splitlines()[1:] if line.strip()}
    assert {"accumulate", "reduce", "backward_rows", "backward_params"} <= compiled_kernels, (
        f"triton_aot skipped a kernel:\n{report[-6000:]}")
