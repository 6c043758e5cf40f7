import os

# Triton's interpreter is chosen when a kernel is decorated, so it must be on before fvkernels (or triton)
# is imported: the "triton" backend then runs on CPU tensors in the tests.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fvkernels.ops import _extension  # noqa: E402

from tests.helpers import runnable_isas  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=runnable_isas())
def isa(request, monkeypatch):
    """Runs the test once per instruction-set build (FVK_CPU_ISA is read at every call)."""
    monkeypatch.setenv("FVK_CPU_ISA", request.param)
    assert _extension.extension().cpu_kernel_isa() == request.param
    return request.param


@pytest.fixture
def poisoned_gradients(monkeypatch):
    """Every buffer a backward launcher allocates with new_empty starts as NaN, so an element the kernel fails to
    write shows."""
    empty = torch.Tensor.new_empty

    def poisoned(self, *shape, **options):
        return empty(self, *shape, **options).fill_(float("nan"))

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)
