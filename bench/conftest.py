"""Two modes of the same benchmarks.

`pytest bench/ --benchmark`: full sizes, pytest-benchmark's repeated timing, the raw JSON saved under
bench/results/, then bench/RESULTS.md and the throughput plot written by report.py.
`pytest bench/`: a smoke run for CI: tiny sizes, every function called once (benchmark_disable), no files.
"""
from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Optional

import pytest
import torch
from torch import Tensor

from bench import report
from bench.cases import Case
from bench.measure import measure_ceilings, synchronized
from bench.providers import Provider

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="fvkernels: run bench/ at full sizes with repeated timing, save the JSON under "
                          "bench/results/ and write bench/RESULTS.md (default: a tiny, untimed smoke run)")


def pytest_configure(config):
    # Runs before pytest-benchmark's own pytest_configure (trylast), which reads these options.
    if not config.getoption("--benchmark"):
        config.option.benchmark_disable = True
        return
    if config.option.benchmark_json is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        RESULTS_DIR.mkdir(exist_ok=True)
        config.option.benchmark_json = RESULTS_DIR / f"{stamp}.json"
    config.option.verbose = max(config.option.verbose, 1)  # one line per case: the progress of a long run


class BenchSession:
    """The run's mode, the machine's ceilings (per device, measured in this process before its first case and
    again at the end) and the providers that could not run, with why."""

    def __init__(self, full: bool):
        self.full = full
        self.ceilings: Dict[str, dict] = {}
        self.unavailable: Dict[str, str] = {}

    def final_ceilings(self) -> Dict[str, dict]:
        """The ceilings measured again at the end, keeping the better value of each: other work on a shared
        machine comes and goes during a long run, and a ceiling is the best the machine does."""
        for device, first in self.ceilings.items():
            again = measure_ceilings(device, self.full)
            self.ceilings[device] = {key: max(value, again.get(key, value)) for key, value in first.items()}
        return self.ceilings

    def sized(self, case: Case) -> Case:
        return case if self.full else case.smoke()

    def require(self, provider: Provider) -> None:
        reason = provider.unavailable_reason()
        if reason is not None:
            self.unavailable[str(provider)] = reason
            pytest.skip(f"{provider}: {reason}")
        if provider.device not in self.ceilings:
            self.ceilings[provider.device] = measure_ceilings(provider.device, self.full)

    def first_call(self, benchmark, provider: Provider, fn: Callable[[], Tensor]) -> Tensor:
        """Runs fn once untimed by pytest-benchmark (compilation, autotuning, thread pools) and keeps its time."""
        start = time.perf_counter()
        out = synchronized(fn, provider.device)()
        benchmark.extra_info["first_call_s"] = time.perf_counter() - start
        return out

    def time(self, benchmark, provider: Provider, case: Case, fn: Callable[[], Tensor], *, flops: Optional[int],
             nbytes: int, descriptors: int) -> None:
        """pytest-benchmark timing of fn, grouped by case and device, with what the report needs to judge it."""
        benchmark.group = f"{case.group} [{provider.device}]"
        benchmark.extra_info.update(
            provider=provider.name, device=provider.device, dtype=str(provider.dtype).replace("torch.", ""),
            operation=case.operation, case=case.key, sets=case.sets, set_size=case.set_size, channels=case.channels,
            latent=case.latent, descriptors=descriptors, scaling=case.scaling, flops=flops, bytes=nbytes)
        benchmark(synchronized(fn, provider.device))


SESSION_KEY = pytest.StashKey[BenchSession]()


@pytest.fixture(scope="session")
def bench(pytestconfig) -> BenchSession:
    session = BenchSession(pytestconfig.getoption("--benchmark"))
    pytestconfig.stash[SESSION_KEY] = session  # for the JSON hook below
    return session


def _versions() -> dict:
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    return versions


def pytest_benchmark_update_json(config, benchmarks, output_json):
    session = config.stash.get(SESSION_KEY, None)
    output_json["fvkernels"] = {
        "versions": _versions(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),  # other work on the machine skews the timings
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "ceilings": session.final_ceilings() if session else {},
        "unavailable": session.unavailable if session else {},
    }


@pytest.hookimpl(trylast=True)  # after pytest-benchmark has written the JSON and printed its tables
def pytest_terminal_summary(terminalreporter, config):
    json_path = config.option.benchmark_json
    if hasattr(json_path, "write"):  # some pytest-benchmark releases open the file themselves (5.2), others not
        json_path = json_path.name
    if not config.getoption("--benchmark") or json_path is None or not os.path.exists(json_path):
        return
    json_path = Path(json_path).resolve()
    # bench/RESULTS.md reports the runs saved in bench/results/; a JSON saved elsewhere gets its report beside it.
    out_dir = BENCH_DIR if json_path.parent == RESULTS_DIR else json_path.parent
    terminalreporter.section("fvkernels targets")
    for line in report.write_report([json_path], out_dir):
        terminalreporter.write_line(line)
