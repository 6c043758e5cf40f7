"""ONNX: a model holding the layer exports with torch.onnx.export(dynamo=True) and runs in onnxruntime; a graph
that calls the registered op itself exports with the op's onnxscript translation."""
import numpy as np
import pytest
import torch
from torch import nn

from fvkernels.nn import FVVAE
from fvkernels.ops import onnx as fvkernels_onnx

from tests.helpers import random_problem

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'fvkernels[onnx]'")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed: pip install 'fvkernels[onnx]'")


def run_onnx(program, path, *inputs):
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [argument.name for argument in session.get_inputs()]
    return session.run(None, {name: value.numpy() for name, value in zip(names, inputs)})


def relative(actual: np.ndarray, expected: torch.Tensor) -> float:
    expected = expected.detach().numpy()
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_model_with_the_layer_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    layer = FVVAE(24, 11, (40,))
    layer.fit_fisher([torch.rand(6, 24, 4, 4)])
    model = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), layer).eval()
    program = torch.onnx.export(model, (torch.rand(5, 3, 4, 4),), dynamo=True,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    node_types = {node.op_type for node in program.model.graph}
    assert {"MatMul", "Where", "Sqrt", "ReduceSum"} <= node_types  # standard operators, no custom domain
    for batch in (5, 1, 9):
        images = torch.rand(batch, 3, 4, 4)
        (fv,) = run_onnx(program, tmp_path / "model.onnx", images)
        with torch.no_grad():
            assert relative(fv, model(images)) <= 1e-5


class CallsTheOp(nn.Module):
    """A graph with torch.ops.fvkernels.fv_accumulate in it, the whole contract switched on."""

    def __init__(self, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt):
        super().__init__()
        self.dec_weight, self.dec_bias = nn.Parameter(dec_weight), nn.Parameter(dec_bias)
        self.inv_sigma2, self.fisher_rsqrt = nn.Parameter(inv_sigma2), nn.Parameter(fisher_rsqrt)

    def forward(self, z, x, lengths, x_scale):
        return torch.ops.fvkernels.fv_accumulate(z, x, self.dec_weight, self.dec_bias, self.inv_sigma2,
                                                 self.fisher_rsqrt, lengths, x_scale, True, True, "auto")


def test_the_op_translates_to_standard_onnx_operators(tmp_path):
    z, x, w, b, s, f, lengths = [t.float() if t.is_floating_point() else t for t in random_problem(4, 7, 5, 3)]
    model = CallsTheOp(w, b, s, f).eval()
    inputs = (z, x, lengths, torch.rand(4, 7) + 0.5)
    program = torch.onnx.export(model, inputs, dynamo=True, custom_translation_table=fvkernels_onnx.translations())
    out, row_sumsq = run_onnx(program, tmp_path / "op.onnx", *inputs)
    expected_out, expected_sums = model(*inputs)
    assert relative(out, expected_out) <= 1e-5
    assert relative(row_sumsq, expected_sums) <= 1e-5
