"""The machine checks itself: `fvkernels selftest` runs every backend on every device and dtype against the float64
reference, and backend="auto" uses a GPU kernel only after it passed a check on the device. Here the Triton kernel
runs under the interpreter on the CPU, in auto's order for the test, once correct and once broken on purpose."""
import warnings

import pytest
import torch

import fvkernels
from fvkernels.app.cli import main
from fvkernels.ops import dispatch, verification

from tests.helpers import cpu_backends

CPU = torch.device("cpu")
needs_interpreted_triton = pytest.mark.skipif("triton" not in cpu_backends(),
                                              reason="the Triton kernel runs on the CPU only under the interpreter")


@pytest.fixture(autouse=True)
def fresh_verdicts():
    verification.forget_verdicts()
    yield
    verification.forget_verdicts()


def test_selftest_covers_every_backend_and_dtype_and_passes():
    results = fvkernels.selftest()
    ran = {(result.backend, result.dtype) for result in results}
    expected = {(backend, dtype) for backend in cpu_backends() for dtype in ("float64", "float32", "bfloat16", "float16")
                if dispatch.supports_dtype(backend, CPU, getattr(torch, dtype))}
    assert ran == expected
    assert all(result.passed for result in results), [r for r in results if not r.passed]
    cpp32 = next(r for r in results if (r.backend, r.dtype) == ("cpp", "float32"))
    assert cpp32.error <= 1e-5 and cpp32.tolerance == 1e-5


def test_selftest_command_prints_a_table(capsys):
    assert main(["selftest"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["backend", "device", "dtype"]
    assert any(line.startswith("cpp ") and "float32" in line and line.endswith("pass") for line in lines)
    assert lines[-1].endswith("passed")


def auto_tries_triton_first(monkeypatch):
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("triton", "cpp", "torch"))


@needs_interpreted_triton
def test_auto_uses_a_checked_kernel(monkeypatch):
    auto_tries_triton_first(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("auto", CPU, torch.float32) == "triton"


def broken_launch(real_launch):
    def launch(args, **options):
        real_launch(args, **options)
        args.out.mul_(1.01)  # a kernel 1% off, as a miscompiled one might be
    return launch


@needs_interpreted_triton
def test_auto_falls_back_from_a_kernel_that_fails_its_check_and_warns_once(monkeypatch):
    from fvkernels.ops import triton_fv

    auto_tries_triton_first(monkeypatch)
    monkeypatch.setattr(triton_fv, "launch", broken_launch(triton_fv.launch))
    with pytest.warns(RuntimeWarning, match=r"the 'triton' kernel failed its check on cpu in torch.float32 \(relative "
                                            r"errors 2\.0\de-02 of the output"):
        assert dispatch.resolve("auto", CPU, torch.float32) == "cpp"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the verdict is kept: no second check, no second warning
        assert dispatch.resolve("auto", CPU, torch.float32) == "cpp"
        problem = [torch.rand(2, 5, 3), torch.rand(2, 5, 4), torch.rand(4, 3), torch.rand(4), torch.rand(4) + 0.5]
        assert torch.allclose(fvkernels.fv_accumulate(*problem), fvkernels.fv_accumulate(*problem, backend="cpp"))
    assert dispatch.resolve("triton", CPU, torch.float32) == "triton"  # asked for by name: no fallback


@needs_interpreted_triton
def test_the_check_can_be_switched_off(monkeypatch):
    from fvkernels.ops import triton_fv

    auto_tries_triton_first(monkeypatch)
    monkeypatch.setattr(triton_fv, "launch", broken_launch(triton_fv.launch))
    monkeypatch.setenv(verification.TRUST_VARIABLE, "1")
    assert dispatch.resolve("auto", CPU, torch.float32) == "triton"


@needs_interpreted_triton
def test_the_check_runs_when_compiled_code_is_traced(monkeypatch):
    """A model compiled before any eager call still has its kernel checked, at trace time and outside the graph."""
    from fvkernels.ops import triton_fv

    auto_tries_triton_first(monkeypatch)
    monkeypatch.setattr(triton_fv, "launch", broken_launch(triton_fv.launch))
    problem = [torch.rand(2, 5, 3), torch.rand(2, 5, 4), torch.rand(4, 3), torch.rand(4), torch.rand(4) + 0.5]
    compiled = torch.compile(lambda *inputs: fvkernels.fv_accumulate(*inputs), fullgraph=True, backend="aot_eager")
    with pytest.warns(RuntimeWarning, match="the 'triton' kernel failed its check"):
        result = compiled(*problem)
    assert torch.allclose(result, fvkernels.fv_accumulate(*problem, backend="cpp"))


@needs_interpreted_triton
def test_the_check_is_made_in_the_dtype_the_kernel_computes_in(monkeypatch):
    auto_tries_triton_first(monkeypatch)
    problem = [torch.rand(2, 5, 3), torch.rand(2, 5, 4), torch.rand(4, 3), torch.rand(4), torch.rand(4) + 0.5]
    with torch.autocast("cpu", dtype=torch.float16):  # the op computes in float32 then (float16 overflows)
        fvkernels.fv_accumulate(*problem)
    assert list(verification._VERDICTS) == [("triton", "cpu", torch.float32)]


@needs_interpreted_triton
def test_checks_launch_triton_untuned(monkeypatch):
    """A check's small problems take the first viable config instead of timing every one (autotuning them took most
    of the self-test's 16–24 s per dtype on an H200); ordinary launches still tune."""
    from fvkernels.ops import triton_fv

    seen = []
    kernels = triton_fv._kernels
    monkeypatch.setattr(triton_fv, "_kernels", lambda z, plan, precision, deterministic, capturable:
                        seen.append(deterministic) or kernels(z, plan, precision, deterministic, capturable))
    verification.kernel_errors("triton", CPU, torch.float32)
    z, x, w, b, s = torch.rand(1, 3, 2), torch.rand(1, 3, 4), torch.rand(4, 2), torch.rand(4), torch.rand(4)
    fvkernels.fv_accumulate(z, x, w, b, s, backend="triton")
    assert seen == [True, False]
