"""report.py renders the newest saved run: every target judged, every section, and the plot."""
from pathlib import Path

import pytest

from bench.report import PLOT_PNG, RESULTS_MD, TARGETS, saved_runs, write_report

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def test_report_renders_the_newest_run(tmp_path):
    runs = sorted(RESULTS_DIR.glob("*.json"))  # named by UTC time, so the last is the newest
    if not runs:
        pytest.skip("no run saved in bench/results/ yet (`pytest bench/ --benchmark` saves one)")
    lines = write_report([runs[-1]], tmp_path)
    text = (tmp_path / RESULTS_MD).read_text()
    assert len(lines) == len(TARGETS) + 1
    for target in TARGETS:
        assert target.text in text
    for section in ("## Targets", "## Machine ceilings", "## fv_accumulate", "## Pipeline"):
        assert section in text
    assert (tmp_path / PLOT_PNG).stat().st_size > 0


def test_a_cpu_run_and_a_gpu_run_make_one_report(tmp_path):
    import json

    runs = saved_runs(RESULTS_DIR, gpu=False)
    if not runs:
        pytest.skip("no CPU run saved in bench/results/ yet (`pytest bench/ --benchmark` saves one)")
    cpu = json.loads(runs[-1].read_text())
    gpu = json.loads(runs[-1].read_text())  # the same numbers relabelled as a GPU run: only the merging is tested
    for bench in gpu["benchmarks"]:
        bench["extra_info"]["device"] = "cuda"
        bench["group"] = bench["group"].replace("[cpu]", "[cuda]")
    gpu["fvkernels"]["ceilings"] = {"cuda": gpu["fvkernels"]["ceilings"]["cpu"]}
    gpu["fvkernels"]["gpu"] = "a relabelled GPU"
    gpu["fvkernels"]["unavailable"] = {}
    paths = [tmp_path / "cpu.json", tmp_path / "gpu.json"]
    for path, data in zip(paths, (cpu, gpu)):
        path.write_text(json.dumps(data))
    write_report(paths, tmp_path)
    text = (tmp_path / RESULTS_MD).read_text()
    assert text.count("- run of ") == 2 and "GPU: a relabelled GPU" in text
    assert "[cuda]" in text and "[cpu]" in text
    measured = {f"cuda-{bench['extra_info']['provider']}" for bench in gpu["benchmarks"]}
    assert not any(f"  - {name}:" in text for name in measured)  # measured by the GPU run: no longer unavailable


def test_the_gpu_check_skips_cleanly_without_a_gpu():
    import os
    import subprocess
    import sys

    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bench/gpu_check.py would run in full")
    script = Path(__file__).resolve().parent / "gpu_check.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stderr
    assert "no CUDA device on this machine; nothing to check" in result.stdout


def test_the_instruction_peaks_are_measured_where_the_probe_builds():
    import platform
    import shutil

    from bench.measure import instruction_peaks
    if platform.machine() not in ("x86_64", "AMD64") or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("the probe (bench/cpu_peak.cpp) needs a C++ compiler and an x86-64 CPU")
    peaks = instruction_peaks()
    assert peaks["fma_gflops_float32"] > 0
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert ("dot_gflops_bfloat16" in peaks) == (" avx512_bf16" in flags and " avx512f" in flags)
    if "dot_gflops_bfloat16" in peaks:  # a bf16 pair product is two multiply-adds per lane: it never loses
        assert peaks["dot_gflops_bfloat16"] > peaks["fma_gflops_float32"]
