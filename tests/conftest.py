import os

# Triton's interpreter is chosen when a kernel is decorated, so it must be on before fvkernels (or triton)
# is imported: the "triton" backend then runs on CPU tensors in the tests.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fvkernels.ops import dispatch  # noqa: E402


def cpu_backends():
    """Backends that run on CPU tensors in this process."""
    return [b for b in dispatch.BACKENDS if dispatch.unavailable_reason(b, torch.device("cpu")) is None]


def gpu_backends():
    if not torch.cuda.is_available():
        return []
    return [b for b in dispatch.BACKENDS if dispatch.unavailable_reason(b, torch.device("cuda")) is None]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (norm-wise: entries near zero do not blow it up)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
