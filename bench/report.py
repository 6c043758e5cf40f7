"""bench/RESULTS.md and the throughput-vs-T plot from one run's JSON, with each target met or not.

The JSON is pytest-benchmark's (`--benchmark-json`) with the "fvkernels" section bench/conftest.py adds
(ceilings, versions, providers that could not run). `pytest bench/ --benchmark` calls this at its end;
standalone: python bench/report.py [bench/results/RUN.json ...] [--note TEXT]   (default: the newest run; several
runs, e.g. a CPU run and a GPU run, make one report).
Reads only the JSON (no torch), so a saved run can be re-reported anywhere.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = "RESULTS.md"
PLOT_PNG = "throughput_vs_T.png"
BASELINE = "torch"  # providers.BASELINE: the eager composite every ratio refers to
OPERATIONS = (("fv_accumulate", "fv_accumulate (the fused op)"),
              ("fv_accumulate_train", "Training: fv_accumulate forward + backward"),
              ("fv_vae_encode", "Pipeline: fv_vae_encode against the torch pipeline and VLFeat"),
              ("pixels_to_fv", "What a user feels: images per second from pixels to Fisher vectors"),
              ("fine_tune_step", "What a user feels: a fine-tuning step through the layer"))


@dataclass
class Row:
    """One provider on one case and device."""

    provider: str
    device: str
    dtype: str
    case: str
    group: str
    info: dict
    median_s: float
    rounds: int

    @property
    def gflops(self) -> Optional[float]:
        return None if self.info["flops"] is None else self.info["flops"] / self.median_s / 1e9

    def roofline_fraction(self, ceilings: dict) -> Optional[float]:
        """Time the roofline allows, max(FLOPs / GEMM rate, bytes / copy bandwidth), over the measured time."""
        gemm = ceilings.get(f"gemm_gflops_{self.dtype}")
        if self.info["flops"] is None or gemm is None:
            return None
        bound = max(self.info["flops"] / (gemm * 1e9), self.info["bytes"] / (ceilings["copy_gbps"] * 1e9))
        return bound / self.median_s

    def peak_fraction(self, ceilings: dict) -> Optional[float]:
        """GFLOP/s over the CPU's instruction peak of the dtype (bench/cpu_peak.cpp), where measured."""
        peak = ceilings.get(INSTRUCTION_PEAKS.get(self.dtype, ""))
        return None if self.gflops is None or peak is None else self.gflops / peak


# The instruction peak each dtype's arithmetic is bounded by (measure.instruction_peaks).
INSTRUCTION_PEAKS = {"float32": "fma_gflops_float32", "bfloat16": "dot_gflops_bfloat16"}


class Run:
    """One or more runs' JSON read as one: a CPU run and a GPU run (bench/gpu_check.py) make one report. Rows of a
    later run replace an earlier run's for the same case, device and provider; ceilings are kept per device; a
    provider unavailable in one run but measured in another is not listed as unavailable."""

    def __init__(self, *datas: dict):
        self.sources = list(datas)
        rows: Dict[tuple, Row] = {}
        for data in datas:
            for bench in data["benchmarks"]:
                info = bench["extra_info"]
                row = Row(info["provider"], info["device"], info["dtype"], info["case"], bench["group"], info,
                          bench["stats"]["median"], bench["stats"]["rounds"])
                rows[row.case, row.device, row.provider] = row
        self.rows: List[Row] = list(rows.values())
        measured = {f"{row.device}-{row.provider}" for row in self.rows}
        self.extra = {
            "ceilings": {device: ceilings for data in datas for device, ceilings in data["fvkernels"]["ceilings"].items()},
            "unavailable": {name: why for data in datas for name, why in data["fvkernels"]["unavailable"].items()
                            if name not in measured}}
        self.groups: Dict[str, List[Row]] = defaultdict(list)
        for row in self.rows:
            self.groups[row.group].append(row)

    def find(self, case: str, device: str, provider: str) -> Optional[Row]:
        return next((r for r in self.rows if (r.case, r.device, r.provider) == (case, device, provider)), None)

    def speedup(self, row: Row, over: str) -> Optional[float]:
        other = self.find(row.case, row.device, over)
        return None if other is None else other.median_s / row.median_s


# ---- targets (issues 3 and 12): what the CPU kernel and pipeline must reach, each judged on this run ------------------

@dataclass(frozen=True)
class Target:
    text: str
    case: str
    provider: str
    # "speedup" over `versus`; "sgemm" (fraction of the fp32 GEMM ceiling); "memory" (peak extra / output);
    # "ceiling_share": the speedup of a bfloat16 provider over `versus` (its fp32 twin) as a fraction of the ratio
    # of the machine's bf16 and fp32 GEMM ceilings, what bf16 could gain at most
    measure: str
    threshold: float
    versus: Optional[str] = None

    def value(self, run: Run, row: Row) -> Optional[float]:
        if self.measure == "speedup":
            return run.speedup(row, self.versus)
        if self.measure == "sgemm":
            return row.gflops / run.extra["ceilings"][row.device]["gemm_gflops_float32"]
        if self.measure == "ceiling_share":
            ceilings = run.extra["ceilings"][row.device]
            speedup = run.speedup(row, self.versus)
            if speedup is None or "gemm_gflops_bfloat16" not in ceilings:
                return None
            return speedup / (ceilings["gemm_gflops_bfloat16"] / ceilings["gemm_gflops_float32"])
        return row.info["peak_extra_bytes"] / row.info["output_bytes"]

    def shown(self, value: float) -> str:
        return f"{value:.2f}×" if self.measure == "speedup" else f"{value:.0%}"

    def met(self, value: float) -> bool:
        return value <= self.threshold if self.measure == "memory" else value >= self.threshold


TARGETS = (
    Target("cpp fv_accumulate ≥ 2× torch eager at T=50 (video frames, batch 256, C=512)", "frames-c512", "cpp",
           "speedup", 2.0, versus=BASELINE),
    Target("cpp fv_accumulate ≥ 1.4× torch eager at T=784 (images, batch 16)", "images", "cpp", "speedup", 1.4,
           versus=BASELINE),
    Target("cpp fv_accumulate ≥ 70% of the sgemm ceiling at T=50", "frames-c512", "cpp", "sgemm", 0.7),
    Target("cpp fv_accumulate ≥ 70% of the sgemm ceiling at T=784", "images", "cpp", "sgemm", 0.7),
    Target("cpp fv_accumulate into a kept buffer (out=) ≥ 70% of the sgemm ceiling at T=50", "frames-c512",
           "cpp-out", "sgemm", 0.7),
    Target("fv_vae_encode (cpp) ≥ 4× VLFeat vl_fisher (T=784, batch 16)", "pipeline-images", "cpp", "speedup", 4.0,
           versus="vlfeat"),
    Target("fv_vae_encode (cpp) ≥ 1.2× the torch eager pipeline", "pipeline-images", "cpp", "speedup", 1.2,
           versus=BASELINE),
    Target("fv_vae_encode (cpp) peak extra memory ≤ 25% of its output", "pipeline-images", "cpp", "memory", 0.25),
    # issue 12
    *(Target(f"cpp fv_accumulate ≥ 1.2× torch.compile of the composite at T={size}", case, "cpp", "speedup", 1.2,
             versus="torch.compile")
      for size, case in ((16, "sweep-t16"), (50, "frames-c512"), (196, "sweep-t196"), (784, "images"),
                         (1250, "videos"), (3136, "sweep-t3136"))),
    Target("bf16 cpp forward (kept buffer) ≥ 60% of (bf16 ceiling ÷ fp32 ceiling) × fp32 cpp at T=50 (N=256)",
           "frames-c512", "cpp-bf16-out", "ceiling_share", 0.6, versus="cpp-out"),
    Target("bf16 cpp forward ≥ 60% of (bf16 ceiling ÷ fp32 ceiling) × fp32 cpp at T=784", "images", "cpp-bf16",
           "ceiling_share", 0.6, versus="cpp"),
    Target("cpp forward + backward ≥ 2× eager autograd of the composite (N=64, T=196)", "train-t196", "cpp",
           "speedup", 2.0, versus=BASELINE),
    Target("cpp forward + backward ≥ 1.3× torch.compile of the composite (N=64, T=196)", "train-t196", "cpp",
           "speedup", 1.3, versus="torch.compile"),
)
TARGET_DEVICE = "cpu"


def judge(run: Run, target: Target) -> tuple:
    """(measured value as text, verdict) of one target."""
    row = run.find(target.case, TARGET_DEVICE, target.provider)
    value = None if row is None else target.value(run, row)
    if value is None:
        involved = {f"{TARGET_DEVICE}-{name}" for name in (target.provider, target.versus)}
        missing = [f"{name}: {why}" for name, why in run.extra["unavailable"].items() if name in involved]
        return "—", "not measured" + (f" ({'; '.join(missing)})" if missing else "")
    return target.shown(value), ("met" if target.met(value) else "NOT met")


# ---- the markdown ------------------------------------------------------------------------------------------

def _number(value: Optional[float], fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _run_header(run: Run, note: Optional[str]) -> List[str]:
    lines = ["# fvkernels benchmark results", ""]
    for data in run.sources:
        machine, extra = data["machine_info"], data["fvkernels"]
        commit = data.get("commit_info", {})
        cpu_info = machine.get("cpu", {})
        cpu = cpu_info.get("brand_raw") or machine.get("processor") or "unknown CPU"
        if "family" in cpu_info:  # a virtual machine's brand string may not name the generation
            cpu += (f" (family {cpu_info['family']}, model {cpu_info.get('model')}, {cpu_info.get('count')} "
                    "logical CPUs)")
        versions = extra["versions"]
        lines += [f"- run of {data['datetime'][:19].replace('T', ' ')} UTC",
                  f"  - machine: {cpu}, {extra['threads']} torch threads; GPU: {extra['gpu'] or 'none'}; "
                  f"load average (1/5/15 min) at the end: {'/'.join(f'{v:.1f}' for v in extra['load_average'])}",
                  f"  - torch {versions['torch']}, triton {versions['triton'] or 'not installed'}, "
                  f"python {versions['python']}, pytest-benchmark {data['version']}",
                  f"  - fvkernels commit {str(commit.get('id', 'unknown'))[:10]}"
                  f"{' with uncommitted changes' if commit.get('dirty') else ''}"]
    if note:
        lines.append(f"- note: {note}")
    if run.extra["unavailable"]:
        lines.append("- not available in these runs:")
        lines += [f"  - {name}: {why}" for name, why in sorted(run.extra["unavailable"].items())]
    return lines


def _ceilings_table(run: Run) -> List[str]:
    rows, ratios = [], []
    for device, ceilings in sorted(run.extra["ceilings"].items()):
        size = ceilings["gemm_size"]
        rows.append([device, f"{ceilings['gemm_gflops_float32']:.0f} GFLOP/s ({size}³)",
                     _number(ceilings.get("gemm_gflops_bfloat16"), ".0f") + " GFLOP/s",
                     _number(ceilings.get("fma_gflops_float32"), ".0f") + " GFLOP/s",
                     _number(ceilings.get("dot_gflops_bfloat16"), ".0f") + " GFLOP/s",
                     f"{ceilings['copy_gbps']:.1f} GB/s ({ceilings['copy_bytes'] >> 20} MiB)"])
        if "gemm_gflops_bfloat16" in ceilings and "dot_gflops_bfloat16" in ceilings:
            ratios.append(f"- {device}: bf16 ÷ fp32 is {ceilings['gemm_gflops_bfloat16'] / ceilings['gemm_gflops_float32']:.2f}"
                          f" between torch's GEMMs and {ceilings['dot_gflops_bfloat16'] / ceilings['fma_gflops_float32']:.2f}"
                          " between the instruction peaks (what bf16 arithmetic can gain over fp32 on this CPU)")
    table = _table(["device", "sgemm fp32 (torch)", "bf16 GEMM (torch)", "fp32 FMA peak", "bf16 dot peak",
                    "copy (read + write)"], rows)
    return table + ([""] + ratios if ratios else [])


def _group_table(run: Run, rows: List[Row]) -> List[str]:
    memory = any("peak_extra_bytes" in row.info for row in rows)
    header = ["provider", "dtype", "median ms", "ms per set", "sets per s", "GFLOP/s", f"× {BASELINE} eager",
              "of roofline", "of peak", "first call s", "rounds"]
    if memory:
        header += ["peak extra MB", "of output"]
    body = []
    for row in sorted(rows, key=lambda r: r.median_s, reverse=True):
        ceilings = run.extra["ceilings"][row.device]
        line = [row.provider, row.dtype, f"{row.median_s * 1e3:.2f}", f"{row.median_s * 1e3 / row.info['sets']:.3f}",
                f"{row.info['sets'] / row.median_s:.1f}", _number(row.gflops, ".1f"), _number(run.speedup(row, BASELINE), ".2f"),
                _number(row.roofline_fraction(ceilings), ".0%"), _number(row.peak_fraction(ceilings), ".0%"),
                f"{row.info['first_call_s']:.2f}", str(row.rounds)]
        if memory:
            extra_bytes = row.info.get("peak_extra_bytes")
            line += [_number(None if extra_bytes is None else extra_bytes / 2 ** 20, ".1f"),
                     _number(None if extra_bytes is None else extra_bytes / row.info["output_bytes"], ".0%")]
        body.append(line)
    return _table(header, body)


def markdown(run: Run, target_lines: List[List[str]], note: Optional[str]) -> str:
    lines = _run_header(run, note)
    lines += ["", "## Targets (issues 3 and 12, CPU)", ""] + _table(["target", "measured", "verdict"], target_lines)
    lines += ["", "## Machine ceilings (measured in the same process)", ""] + _ceilings_table(run)
    for operation, title in OPERATIONS:
        lines += ["", f"## {title}"]
        for group, rows in run.groups.items():
            if rows[0].info["operation"] == operation:
                lines += ["", f"### {group}", ""] + _group_table(run, rows)
    lines += ["", f"![fv_accumulate GFLOP/s against T]({PLOT_PNG})", "", "## How the numbers are computed", "",
              "- Times are pytest-benchmark's median over its rounds, after one untimed first call (compilation, "
              "autotuning; its time is the \"first call\" column). GPU calls end with a device synchronisation.",
              "- FLOPs of fv_accumulate: valid descriptors × (2·C·d + 2·C·(d+1)); the pipeline adds the encoder's "
              "2·Σ(in·out) per descriptor (DESIGN §1). VLFeat computes a different model: only its time compares. "
              "A training step counts three times the forward's FLOPs (two GEMMs forward, four backward).",
              "- Bytes: every input read once plus the output written once.",
              "- Of roofline: max(FLOPs / GEMM rate of the dtype, bytes / copy bandwidth) over the measured time.",
              "- Of peak (CPU): GFLOP/s over the instruction peak of the dtype (bench/cpu_peak.cpp: chains of fp32 "
              "FMAs, of bf16 vdpbf16ps), a bound no kernel can pass, where torch's GEMM can sit well below it.",
              "- Peak extra memory: what fv_vae_encode (or the baseline) allocates beyond its input and output "
              "(torch.profiler on CPU, the CUDA allocator's peak on GPU).", ""]
    return "\n".join(lines)


def plot(run: Run, path: Path) -> None:
    """GFLOP/s against T of the cases on the scaling sweep, one line per provider and device."""
    series: Dict[str, list] = defaultdict(list)
    for row in run.rows:
        if row.info["scaling"]:
            series[f"{row.device} {row.provider} ({row.dtype})"].append((row.info["set_size"], row.gflops))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(series.items()):
        sizes, rates = zip(*sorted(points))
        axes.plot(sizes, rates, marker="o", label=label)
    for (device, ceilings), style in zip(sorted(run.extra["ceilings"].items()), ("--", ":")):
        axes.axhline(ceilings["gemm_gflops_float32"], linestyle=style, color="grey", linewidth=1,
                     label=f"{device} sgemm {ceilings['gemm_size']}³ ceiling")
    axes.set_xscale("log")
    axes.set_xlabel("descriptors per set T")
    axes.set_ylabel("GFLOP/s")
    axes.set_title("fv_accumulate throughput (C=512, d=256, ≈12.8k descriptors per call)")
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_report(json_paths: Sequence[Path], out_dir: Path, note: Optional[str] = None) -> List[str]:
    """Writes RESULTS.md and the plot of the runs (read as one, see Run) into out_dir; returns one line per target
    for the terminal."""
    run = Run(*(json.loads(Path(path).read_text()) for path in json_paths))
    target_lines = [[target.text, *judge(run, target)] for target in TARGETS]
    (out_dir / RESULTS_MD).write_text(markdown(run, target_lines, note))
    plot(run, out_dir / PLOT_PNG)
    return [f"{verdict:>12}  {measured:>7}  {text}" for text, measured, verdict in target_lines] + [
        f"wrote {out_dir / RESULTS_MD} and {out_dir / PLOT_PNG} from {', '.join(map(str, json_paths))}"]


def saved_runs(folder: Path, gpu: bool) -> List[Path]:
    """The CPU runs (gpu=False) or the GPU runs (bench/gpu_check.py names their JSON *-gpu.json) saved in folder,
    oldest first."""
    return sorted(path for path in folder.glob("*.json") if path.stem.endswith("-gpu") == gpu)  # named by UTC time


def newest_runs(folder: Path) -> List[Path]:
    """The newest CPU run and the newest GPU run in folder: what RESULTS.md reports together."""
    return saved_runs(folder, gpu=False)[-1:] + saved_runs(folder, gpu=True)[-1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="*", type=Path,
                        help="runs' JSON, reported as one (default: the newest CPU and GPU runs in bench/results/)")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR, help="where RESULTS.md and the plot go")
    parser.add_argument("--note", help="a line about the run (what was available, how busy the machine was)")
    args = parser.parse_args()
    json_paths = args.json or newest_runs(BENCH_DIR / "results")
    for line in write_report(json_paths, args.out_dir, args.note):
        print(line)


if __name__ == "__main__":
    main()
