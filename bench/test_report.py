"""report.py renders the newest saved run: every target judged, every section, and the plot."""
from pathlib import Path

import pytest

from bench.report import PLOT_PNG, RESULTS_MD, TARGETS, write_report

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def test_report_renders_the_newest_run(tmp_path):
    runs = sorted(RESULTS_DIR.glob("*.json"))  # named by UTC time, so the last is the newest
    if not runs:
        pytest.skip("no run saved in bench/results/ yet (`pytest bench/ --benchmark` saves one)")
    lines = write_report(runs[-1], tmp_path)
    text = (tmp_path / RESULTS_MD).read_text()
    assert len(lines) == len(TARGETS) + 1
    for target in TARGETS:
        assert target.text in text
    for section in ("## Targets", "## Machine ceilings", "## fv_accumulate", "## Pipeline"):
        assert section in text
    assert (tmp_path / PLOT_PNG).stat().st_size > 0
