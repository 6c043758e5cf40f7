"""Compiles the Triton kernels ahead of time for NVIDIA targets, without a GPU, and checks their resources.

    python -m fvkernels.ops.triton_aot [--arch 90 80] [--jobs N]

Every kernel of triton_fv.py is compiled for every autotune config the pruner admits, every dtype and a
few representative specializations (d, optional inputs, x layout), exactly as the JIT would specialize
them for a typical problem. A table lists registers and spills (from ptxas -v) and shared memory (from
the compiler's metadata) per compile; the exit status is non-zero when a compile fails, a config needs
more shared memory than the target has, or spills beyond MAX_SPILL_BYTES. That makes the pruning model
in triton_fv.py (viable_configs) something CI can hold to account.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import triton
from triton.backends.compiler import GPUTarget

from fvkernels.ops import triton_fv

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) of each target.
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ELEMENT_TYPES = {"fp32": 4, "fp16": 2, "bf16": 2}
# d = 7 (small, unaligned rows), 255 (the paper's: d+1 = 256, unaligned rows), 256, 512 (two d-tiles).
LATENTS = (7, 255, 256, 512)
# Up to 32 spilled words per thread stay in L1 and cost little; the configs this guards against (ones
# the pruning model should have rejected) spill kilobytes.
MAX_SPILL_BYTES = 128
# Each compile holds ~0.5 GB: more parallel jobs than this rarely pay off.
MAX_DEFAULT_JOBS = 8


@dataclass(frozen=True)
class Problem:
    """The typical problem whose argument values decide the JIT's specializations: ints equal to 1
    become constants and multiples of 16 get divisibility hints, as in triton.runtime.jit."""
    num_sets: int = 8
    set_size: int = 784  # a 28×28 map
    channels: int = 512
    t_splits: int = 4  # only read when the workspace path is compiled
    channel_major_x: bool = False  # x as an (N, C, H·W) map viewed as (N, T, C)


@dataclass(frozen=True)
class Job:
    kernel: str
    arch: int
    dtype: str
    latent: int
    variant: str
    constexprs: tuple  # (name, value) pairs
    num_warps: int
    num_stages: int
    problem: Problem = field(default_factory=Problem)

    @property
    def config_label(self) -> str:
        meta = dict(self.constexprs)
        blocks = "/".join(str(meta[name]) for name in ("BLOCK_C", "BLOCK_T", "BLOCK_J") if name in meta)
        return f"{blocks} w{self.num_warps} s{self.num_stages}"


@dataclass
class Result:
    job: Job
    seconds: float = 0.0
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared: Optional[int] = None
    error: Optional[str] = None

    def problems(self) -> list:
        if self.error is not None:
            return [self.error]
        found = []
        if self.shared > SHARED_MEMORY_LIMIT[self.job.arch]:
            found.append(f"shared memory {self.shared} B > {SHARED_MEMORY_LIMIT[self.job.arch]} B")
        if self.spill_bytes is None:
            found.append("no ptxas log (needs triton >= 3.4 for TRITON_DUMP_PTXAS_LOG)")
        elif self.spill_bytes > MAX_SPILL_BYTES:
            found.append(f"spills {self.spill_bytes} B > {MAX_SPILL_BYTES} B")
        return found


# ---- the specializations -------------------------------------------------------------------------------

FLAG_VARIANTS = {
    # every optional input and the finishing epilogue: the most live state
    "all": dict(HAS_X_SCALE=True, HAS_LENGTHS=True, HAS_FISHER=True, SIGNED_SQRT=True, FINISH=True),
    "plain": dict(HAS_X_SCALE=False, HAS_LENGTHS=False, HAS_FISHER=False, SIGNED_SQRT=False, FINISH=True),
    # a T-split writing raw sums to the workspace (the reduction kernel finishes)
    "split": dict(HAS_X_SCALE=True, HAS_LENGTHS=True, HAS_FISHER=False, SIGNED_SQRT=False, FINISH=False),
}


# Compiled for the first viable config only, on the first arch: they share the main loop with "all"
# (fp16 with bf16, tf32 and ieee with the fp32 main loop); only the prologue, epilogue or operand types differ. A
# precision of None is the arch's fp32 default (triton_fv.forward_fp32_precision).
EXTRA_VARIANTS = (("bf16", "plain", "ieee"), ("bf16", "split", "ieee"), ("bf16", "all+nchw", "ieee"),
                  ("fp16", "all", "ieee"), ("fp32", "all+tf32", "tf32"), ("fp32", "all+ieee", "ieee"),
                  ("bf16", "all+wide", "ieee"), ("fp32", "all+wide", None))


def tuning_problem(arch: int, dtype: str, latent: int, precision: str, problem: Problem):
    element_size = ELEMENT_TYPES[dtype]
    return triton_fv.TuningProblem(
        element_size=element_size, plan=triton_fv.tile_plan(latent, element_size), dot_precision=precision,
        z_rows_aligned=triton_fv.divisible_by_16(problem.set_size * latent, latent),
        shared_memory=SHARED_MEMORY_LIMIT[arch])


def accumulate_job(arch: int, dtype: str, latent: int, config, variant: str, precision: str) -> Job:
    problem = Problem(channel_major_x=variant.endswith("+nchw"))
    plan = tuning_problem(arch, dtype, latent, precision, problem).plan
    flags = dict(FLAG_VARIANTS[variant.split("+")[0]])
    flags["HAS_ROW_SUMSQ"] = flags["FINISH"]
    constexprs = dict(LATENT=latent, BLOCK_D=plan.block_d, D_TILES=plan.d_tiles, BLOCK_K=plan.block_k,
                      DOT_PRECISION=precision, WIDE_OFFSETS=variant.endswith("+wide"),
                      DETERMINISTIC=False, **flags, **config.kwargs)
    return Job("accumulate", arch, dtype, latent, variant, tuple(constexprs.items()), config.num_warps,
               config.num_stages, problem)


def configs_for(arch: int, dtype: str, latent: int, precision: str) -> list:
    problem = tuning_problem(arch, dtype, latent, precision, Problem())
    return triton_fv.viable_configs(triton_fv.GPU_CONFIGS, problem)


def reduce_job(arch: int, dtype: str, latent: int) -> Job:
    row_length = latent + 1
    constexprs = dict(ROW_LENGTH=row_length, HAS_FISHER=True, SIGNED_SQRT=True, HAS_ROW_SUMSQ=True,
                      BLOCK_C=triton_fv.REDUCE_BLOCK_C, BLOCK_J=triton_fv.reduce_block_j(row_length))
    return Job("reduce", arch, dtype, latent, "all", tuple(constexprs.items()), 4, 1)


# The d the backward kernels are compiled for: small, and the widest each element size takes (a wider d runs the
# reference's torch code).
BACKWARD_LATENTS = {dtype: (7, 33, triton_fv.MAX_BACKWARD_D[size] - 1, triton_fv.MAX_BACKWARD_D[size])
                    for dtype, size in ELEMENT_TYPES.items()}


def backward_job(kernel: str, arch: int, dtype: str, latent: int) -> Job:
    """One of the backward kernels with every optional input and every gradient, as triton_fv.backward
    launches it on the GPU."""
    tiles = triton_fv.backward_tiles(ELEMENT_TYPES[dtype], latent)
    constexprs = dict(LATENT=latent, BLOCK_D=triton.next_power_of_2(max(latent, 16)),
                      BLOCK_T=tiles.block_t, BLOCK_C=tiles.block_c, HAS_X_SCALE=True,
                      HAS_LENGTHS=True, HAS_FISHER=True,
                      DOT_PRECISION=triton_fv.BACKWARD_FP32_PRECISION)
    constexprs.update(dict(NEED_Z=True, NEED_X=True, NEED_SCALE=True) if kernel == "backward_rows"
                      else dict(NEED_W=True))
    return Job(kernel, arch, dtype, latent, "all", tuple(constexprs.items()), tiles.num_warps, tiles.num_stages)


def all_jobs(arches) -> list:
    """Every viable config of the bf16 and fp32 (triton_fv.forward_fp32_precision) main loops per arch and d; the
    other variants on the first arch; the split reduction per arch, dtype and d; the backward kernels per arch, dtype
    and d."""
    jobs = []
    for arch in arches:
        for latent in LATENTS:
            for dtype, precision in (("bf16", "ieee"), ("fp32", triton_fv.forward_fp32_precision(arch))):
                jobs += [accumulate_job(arch, dtype, latent, config, "all", precision)
                         for config in configs_for(arch, dtype, latent, precision)]
            if arch == arches[0]:
                extras = [(dtype, variant, precision or triton_fv.forward_fp32_precision(arch))
                          for dtype, variant, precision in EXTRA_VARIANTS]
                jobs += [accumulate_job(arch, dtype, latent, configs_for(arch, dtype, latent, precision)[0],
                                        variant, precision) for dtype, variant, precision in extras]
            jobs += [reduce_job(arch, dtype, latent) for dtype in ELEMENT_TYPES]
        jobs += [backward_job(kernel, arch, dtype, latent) for kernel in ("backward_rows", "backward_params")
                 for dtype in ("bf16", "fp32") for latent in BACKWARD_LATENTS[dtype]]
    # An extra variant can be a main loop under another label (fp32 "all+ieee" where the arch's main loop is ieee):
    # compiled once, as a second compile would come from the cache with no ptxas report.
    unique = {}
    for job in jobs:
        unique.setdefault(dataclasses.replace(job, variant=""), job)
    return list(unique.values())


# ---- compiling one job ---------------------------------------------------------------------------------

def _argument_values(job: Job) -> dict:
    """The runtime (non-constexpr) arguments of job's kernel for its typical problem."""
    p, latent = job.problem, job.latent
    row_length = latent + 1
    if job.kernel == "reduce":
        return dict(C=p.channels, t_splits=p.t_splits, workspace_stride_split=p.num_sets * p.channels * row_length,
                    workspace_stride_set=p.channels * row_length, out_stride_set=p.channels * row_length)
    strides = dict(stride_zn=p.set_size * latent, stride_zt=latent, stride_zk=1, stride_xn=p.set_size * p.channels,
                   stride_xt=p.channels, stride_xc=1, stride_sn=p.set_size, stride_st=1, stride_wc=latent,
                   stride_wk=1, stride_gn=p.channels * row_length)
    if job.kernel == "backward_rows":
        return dict(T=p.set_size, C=p.channels, **strides)
    if job.kernel == "backward_params":
        return dict(N=p.num_sets, T=p.set_size, C=p.channels, sets_per_group=2, stride_group_w=p.channels * latent,
                    stride_group_c=p.channels, **strides)
    x_strides = ((p.channels * p.set_size, 1, p.set_size) if p.channel_major_x
                 else (p.set_size * p.channels, p.channels, 1))
    finish = dict(job.constexprs)["FINISH"]
    workspace_set = p.channels * row_length
    return dict(N=p.num_sets, T=p.set_size, C=p.channels, t_splits=1 if finish else p.t_splits,
                stride_zn=p.set_size * latent, stride_zt=latent, stride_zk=1,
                stride_xn=x_strides[0], stride_xt=x_strides[1], stride_xc=x_strides[2],
                stride_sn=p.set_size, stride_st=1, stride_wc=latent, stride_wk=1,
                dst_stride_set=workspace_set, dst_stride_split=0 if finish else p.num_sets * workspace_set)


def _pointer_types(job: Job) -> dict:
    element = f"*{job.dtype}"
    if job.kernel.startswith("backward"):
        inputs = dict(z_ptr=element, x_ptr=element, x_scale_ptr=element, w_ptr=element, b_ptr=element,
                      s_ptr=element, fisher_ptr=element, lengths_ptr="*i64", grad_out_ptr=element)
        if job.kernel == "backward_rows":
            return dict(inputs, grad_z_ptr=element, grad_x_ptr=element, grad_scale_ptr=element)
        return dict(inputs, grad_w_ptr="*fp32", grad_b_ptr="*fp32", grad_s_ptr="*fp32")
    if job.kernel == "reduce":
        return dict(workspace_ptr="*fp32", out_ptr=element, fisher_ptr=element, row_sumsq_ptr="*fp32")
    finish = dict(job.constexprs)["FINISH"]
    return dict(z_ptr=element, x_ptr=element, x_scale_ptr=element, w_ptr=element, bias_ptr=element,
                inv_sigma2_ptr=element, fisher_ptr=element, lengths_ptr="*i64",
                dst_ptr=element if finish else "*fp32", row_sumsq_ptr="*fp32")


def _source(job: Job):
    """The ASTSource the JIT would build: ints of 1 become constants, multiples of 16 get hints."""
    # the accumulate kernel's JITFunction sits inside its autotuner
    fn = {"accumulate": triton_fv._fv_accumulate_kernel.fn, "reduce": triton_fv._fv_reduce_splits_kernel,
          "backward_rows": triton_fv._fv_backward_rows_kernel,
          "backward_params": triton_fv._fv_backward_params_kernel}[job.kernel]
    constexprs = dict(job.constexprs)
    signature, hinted = {}, []
    values = _argument_values(job)
    pointers = _pointer_types(job)
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            hinted.append(index)  # torch allocations are 16-byte aligned
        elif values[name] == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if triton_fv.divisible_by_16(values[name]):
                hinted.append(index)
    attrs = {(index,): [["tt.divisibility", 16]] for index in hinted}
    return triton.compiler.ASTSource(fn, signature, constexprs, attrs)


def compile_job(job: Job) -> Result:
    result = Result(job)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v's report
            compiled = triton.compile(_source(job), target=GPUTarget("cuda", job.arch, 32),
                                      options=dict(num_warps=job.num_warps, num_stages=job.num_stages,
                                                  enable_fp_fusion=True))  # the JIT's default
    except Exception as error:  # any compiler failure is a finding to report, not a crash
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
        return result
    result.seconds = time.perf_counter() - start
    result.shared = compiled.metadata.shared
    report = log.getvalue()
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if registers and spills:
        result.registers = int(registers.group(1))
        result.spill_bytes = max(int(spills.group(1)), int(spills.group(2)))
    return result


def _worker_init(cache_dir: str) -> None:
    # A private cache: a cached kernel would skip ptxas and so print no report.
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


# ---- the report ----------------------------------------------------------------------------------------

COLUMNS = ("kernel", "arch", "dtype", "d", "variant", "config", "regs", "spill B", "smem KiB", "sec", "status")


def _row(result: Result) -> tuple:
    job = result.job
    problems = result.problems()
    return (job.kernel, f"sm_{job.arch}", job.dtype, str(job.latent), job.variant, job.config_label,
            "-" if result.registers is None else str(result.registers),
            "-" if result.spill_bytes is None else str(result.spill_bytes),
            "-" if result.shared is None else f"{result.shared / 1024:.0f}",
            f"{result.seconds:.1f}", "; ".join(problems) if problems else "ok")


def format_table(results) -> str:
    rows = [COLUMNS] + [_row(result) for result in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fvkernels.ops.triton_aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_MEMORY_LIMIT),
                        help="compute capabilities to compile for (default: 90 80)")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, MAX_DEFAULT_JOBS),
                        help=f"parallel compiles (default: the cores, at most {MAX_DEFAULT_JOBS})")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton_aot: TRITON_INTERPRET is set, so @triton.jit yields interpreted functions that cannot be "
              "compiled; run it without TRITON_INTERPRET", file=sys.stderr)
        return 2
    jobs = all_jobs(args.arch)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fvkernels-aot-") as cache_dir:
        # spawn: a forked child would inherit this process's (unused) triton state and the parent's cache dir
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(cache_dir,)) as pool:
            results = list(pool.map(compile_job, jobs))
    elapsed = time.perf_counter() - start
    print(format_table(results))
    failed = [result for result in results if result.problems()]
    print(f"\n{len(results)} compiles ({len(jobs) - len(failed)} ok, {len(failed)} failed) in {elapsed:.0f} s "
          f"with {args.jobs} parallel jobs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
