import os

# Triton's interpreter is chosen when a kernel is decorated, so it must be on before fvkernels (or triton)
# is imported: the "triton" backend then runs on CPU tensors in the tests.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
