"""The Triton forward and backward as triton_ops (fvkernels::fv_accumulate_triton and its backward,
fvkernels::fv_accumulate_backward_triton): their numbers under the interpreter, and what torch.compile captures of
them — the Triton kernels themselves, visible to Inductor, instead of an opaque op.

Capture runs in a subprocess outside the interpreter (tests/capture_on_stand_in_gpu.py: fake CUDA tensors and a
stand-in for an H100's driver); on a machine with a GPU, test_fv_accumulate.py's gpu tests compile it for real.
"""
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fvkernels.ops import dispatch
from fvkernels.ops.fv_accumulate import _TRITON_CAPTURE, fv_accumulate_triton_op
from fvkernels.ops.reference import fv_accumulate_outputs

from tests.helpers import random_problem, relative_error

pytest.importorskip("triton", reason="triton is not installed")
fv_accumulate_module = importlib.import_module("fvkernels.ops.fv_accumulate")  # not the function fvkernels.ops exports
REPO_ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = pytest.mark.skipif(dispatch.unavailable_reason("triton", torch.device("cpu")) is not None,
                                 reason="the Triton backend needs the interpreter on the CPU")


def as_float64(values):
    return [value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for value in values]


@INTERPRETED
@pytest.mark.parametrize("epilogue", [False, True])
def test_triton_op_matches_the_float64_reference(epilogue):
    z, x, w, b, s, f, lengths = [t if t is None or not t.is_floating_point() else t.float()
                                 for t in random_problem(3, 37, 9, 7)]
    x_scale = torch.rand(z.shape[:2]) + 0.5 if epilogue else None
    inputs = (z, x, w, b, s, f if epilogue else None, lengths if epilogue else None, x_scale, epilogue, epilogue)
    out, row_sumsq = fv_accumulate_triton_op(*inputs)
    want_out, want_row_sumsq = fv_accumulate_outputs(*as_float64(inputs))
    assert relative_error(out, want_out) <= 1e-5
    assert row_sumsq.shape == (3, 9 if epilogue else 0)
    if epilogue:
        assert relative_error(row_sumsq, want_row_sumsq) <= 1e-5


@INTERPRETED
def test_triton_op_gradients_match_the_float64_reference():
    z, x, w, b, s, f, lengths = [t if t is None or not t.is_floating_point() else t.float()
                                 for t in random_problem(2, 21, 11, 5)]
    x_scale = torch.rand(z.shape[:2]) + 0.5
    differentiable = [z, x, w, b, s, x_scale]
    weights = torch.randn(2, 11, 6, dtype=torch.float64)

    def loss(z, x, w, b, s, x_scale, op):
        out, _ = op(z, x, w, b, s, f if z.dtype == torch.float32 else f.double(), lengths, x_scale, False, False)
        return (out.double() * weights).sum()

    leaves = [t.clone().requires_grad_() for t in differentiable]
    got = torch.autograd.grad(loss(*leaves, fv_accumulate_triton_op), leaves)
    leaves64 = [t.double().requires_grad_() for t in differentiable]
    want = torch.autograd.grad(loss(*leaves64, lambda *a: fv_accumulate_outputs(*a)), leaves64)
    for name, got_grad, want_grad in zip("z x w b s x_scale".split(), got, want):
        assert relative_error(got_grad, want_grad) <= 1e-5, name


@INTERPRETED
def test_the_triton_op_differentiates_through_the_triton_backward_op(monkeypatch):
    calls = []
    backward_op = fv_accumulate_module.fv_accumulate_backward_triton_op
    monkeypatch.setattr(fv_accumulate_module, "fv_accumulate_backward_triton_op",
                        lambda *args: calls.append(args[-1]) or backward_op(*args))
    z, x, w, b, s, f, lengths = [t if t is None or not t.is_floating_point() else t.float().requires_grad_()
                                 for t in random_problem(2, 9, 5, 3)]
    out, _ = fv_accumulate_triton_op(z, x, w, b, s, f.detach(), lengths, None, True, False)
    out.sum().backward()
    assert calls == [[True, True, True, True, True, False]]


@pytest.fixture(scope="module")
def captured():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "-m", "tests.capture_on_stand_in_gpu"], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-6000:]
    return {case["case"]: case for case in map(json.loads, completed.stdout.splitlines())}


# What the kernels may write: the op's outputs and its own workspaces (split-T partial sums, d-tile row sums).
KERNEL_OUTPUTS = {"dst_ptr", "row_sumsq_ptr", "out_ptr"}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["plain", "epilogue", "bf16 d-tiled", "split T", "dynamic batch"])
def test_torch_compile_sees_the_triton_kernels(captured, case):
    result = captured[case]
    assert result["ops"] == [], f"an opaque fvkernels op is left in the graph: {result}"
    splits_t = case in ("split T", "dynamic batch")  # few sets of 600+ descriptors leave SMs idle: T is split
    expected = ["_fv_accumulate_kernel"] + (["_fv_reduce_splits_kernel"] if splits_t else [])
    assert result["kernels"] == expected
    for written in result["written"]:  # the mutation analysis ran: inputs are not copied defensively
        assert written and set(written) <= KERNEL_OUTPUTS, result
    assert result["batch_guards"] == [], "the launcher's choices would recompile per batch size"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["backward", "backward bf16 dynamic batch"])
def test_torch_compile_sees_the_triton_backward_kernels(captured, case):
    result = captured[case]
    assert result["ops"] == [], f"an opaque fvkernels op is left in the graph: {result}"
    assert result["kernels"] == ["_fv_backward_rows_kernel", "_fv_backward_params_kernel"]
    # each kernel writes only its gradients: no input is copied defensively before it
    assert result["written"] == [["grad_scale_ptr", "grad_x_ptr", "grad_z_ptr"], ["grad_b_ptr", "grad_s_ptr", "grad_w_ptr"]]
    assert result["batch_guards"] == [], "the launcher's choices would recompile per batch size"


@pytest.mark.slow
def test_compile_caches_are_keyed_on_the_kernels_sources(captured):
    """torch finds the kernels behind each op by reading its body; without them, a cache hit after an upgrade of
    fvkernels would reuse code compiled from the old kernels."""
    assert captured["cache keys"]["kernels"] == ["_fv_accumulate_kernel", "_fv_reduce_splits_kernel"]
    assert captured["backward cache keys"]["kernels"] == ["_fv_backward_params_kernel", "_fv_backward_rows_kernel"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["cuda backend", "export"])
def test_other_backends_and_export_keep_the_backend_neutral_op(captured, case):
    assert captured[case] == dict(case=case, ops=["fvkernels.fv_accumulate.default"], kernels=[], written=[],
                                  batch_guards=[])


GPU_TRITON = pytest.mark.skipif(not torch.cuda.is_available()
                                or dispatch.unavailable_reason("triton", torch.device("cuda")) is not None,
                                reason="needs a CUDA device with triton")


@pytest.mark.gpu
@GPU_TRITON
@pytest.mark.parametrize("variant", [(False, False), (True, True)])
def test_gpu_triton_op_passes_opcheck(variant):
    epilogue, with_row_sumsq = variant
    z, x, w, b, s, f, lengths = [t if t is None or not t.is_floating_point() else t.float().requires_grad_()
                                 for t in random_problem(3, 37, 9, 7, device="cuda")]
    torch.library.opcheck(fv_accumulate_triton_op, [z, x, w, b, s, f if epilogue else None,
                                                    lengths if epilogue else None, None, epilogue, with_row_sumsq])


def called_names(codes) -> list:
    """The fvkernels ops and kernels that Inductor's generated code names: what a failure reports."""
    return sorted({name for code in codes for name in re.findall(r"fvkernels\.\w+|_fv_\w+", code)})


@pytest.mark.gpu
@GPU_TRITON
@pytest.mark.xfail(reason="failed on an NVIDIA H200 with torch 2.11 and triton 3.6 (2026-12-04): Inductor's code "
                          "did not show _fv_accumulate_kernel; not yet diagnosed (the message now lists what it calls)",
                   strict=False)
@pytest.mark.parametrize("backend,dtype,tolerance", [("triton", torch.float32, 1e-5), ("auto", torch.bfloat16, 2e-2)])
def test_gpu_inductor_compiles_the_triton_kernel_into_its_code(backend, dtype, tolerance):
    """On a GPU: torch.compile (Inductor, fullgraph) of an encoding puts _fv_accumulate_kernel into the code it
    generates, and _fv_backward_rows_kernel into its backward's (with the "auto" backend, which takes Triton for
    16-bit inputs, the fused backward's d limit holds: d = 7), and the compiled result and gradient equal eager's."""
    from torch._inductor.utils import run_and_get_code

    import fvkernels

    z, x, w, b, s, f, lengths = [t if t is None or not t.is_floating_point() else t.to(dtype)
                                 for t in random_problem(5, 50, 17, 7, device="cuda")]

    def encode(z, x):
        fv = fvkernels.fv_accumulate(torch.tanh(z), x, w, b, s, f, lengths, backend=backend)
        return torch.tanh(fv.flatten(1))

    # Where torch may pad an intermediate after a capture fixed its strides (no eager input values, pytorch#147828)
    # the compiled code calls the backend-neutral op instead, which launches the kernels.
    forward_marker, backward_marker = (("_fv_accumulate_kernel", "_fv_backward_rows_kernel") if _TRITON_CAPTURE
                                       else ("fvkernels.fv_accumulate.default", "fvkernels.fv_accumulate_backward"))
    torch._dynamo.reset()
    compiled = torch.compile(encode, fullgraph=True)
    got, codes = run_and_get_code(compiled, z, x)
    assert any(forward_marker in code for code in codes), f"Inductor's code does not call {forward_marker}; it " \
        f"calls {called_names(codes)}"
    assert relative_error(got, encode(z, x)) <= tolerance
    z_grad = z.clone().requires_grad_()
    (want,) = torch.autograd.grad(encode(z_grad, x).square().sum(), z_grad)
    torch._dynamo.reset()
    _, codes = run_and_get_code(lambda: torch.autograd.grad(compiled(z_grad, x).square().sum(), z_grad))
    assert any(backward_marker in code for code in codes), f"Inductor's backward code does not call " \
        f"{backward_marker}; it calls {called_names(codes)}"
    (got_grad,) = torch.autograd.grad(compiled(z_grad, x).square().sum(), z_grad)
    assert relative_error(got_grad, want) <= 10 * tolerance
