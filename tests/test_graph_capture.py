"""The layer inside whole-model graph capture: torch.compile (Inductor) in eval and in training, without a
recompilation per batch size, and torch.export with a dynamic batch dimension through save and load."""
import copy
import io

import pytest
import torch
from torch import nn

from fvkernels.nn import FVVAE

from tests.helpers import relative_error

CHANNELS = 24


def model_with_layer(fitted=True):
    """A small CNN whose post-ReLU map feeds the FV-VAE layer, as a user drops the layer in."""
    torch.manual_seed(0)
    layer = FVVAE(CHANNELS, 11, (40,))
    if fitted:
        layer.fit_fisher([torch.rand(6, CHANNELS, 4, 4)])
    return nn.Sequential(nn.Conv2d(3, CHANNELS, 3, padding=1), nn.ReLU(), layer)


class CompileCounter:
    """An Inductor backend that counts the graphs it is asked to compile."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(graph_module, example_inputs)


def test_eval_model_compiles_once_for_every_batch_size():
    model = model_with_layer().eval()
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        for batch in (5, 7, 2, 9, 3):
            images = torch.rand(batch, 3, 4, 4)
            assert relative_error(compiled(images), model(images)) <= 1e-5
    # the first size compiles a static graph, the second a dynamic one that serves every later size
    assert counter.graphs == 2


def test_training_step_compiles_into_one_graph_and_matches_eager():
    """Judged against float64: the signed square root and the L2 normalisation amplify float32 rounding, so eager's
    own gradients lie up to ~1.3e-4 from float64 (on an AVX2 build); the compiled ones may lie twice as far + 1e-4."""
    model = model_with_layer().train()
    images = torch.rand(6, 3, 4, 4)
    readout = torch.randn(6, model[2].dim)  # a loss that depends on the direction of the unit-norm vectors
    exact = copy.deepcopy(model).double()
    (exact(images.double()) * readout.double()).sum().backward()
    exact_grads = {name: p.grad for name, p in exact.named_parameters()}
    compiled = torch.compile(model, fullgraph=True)
    (compiled(images) * readout).sum().backward()
    compiled_grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    (model(images) * readout).sum().backward()
    eager_grads = {name: p.grad for name, p in model.named_parameters()}
    # the forward reaches every parameter but σz, which only the training losses use
    assert {name for name, grad in eager_grads.items() if grad is None} == {"2.log_sigma_z"}
    for name, want in exact_grads.items():
        if want is not None:
            eager_error = relative_error(eager_grads[name], want)
            assert relative_error(compiled_grads[name], want) <= 2 * eager_error + 1e-4, name


def test_export_with_a_dynamic_batch_survives_save_and_load():
    model = model_with_layer().eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.rand(5, 3, 4, 4),), dynamic_shapes=({0: batch},))
    fused = [node for node in program.graph.nodes if node.target is torch.ops.fvkernels.fv_accumulate.default]
    assert len(fused) == 1  # the fused op, not a decomposition
    assert fused[0].args[-1] == "auto"  # resolved where the program runs, not bound to this machine's backend
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    with torch.no_grad():
        for size in (5, 1, 8):
            images = torch.rand(size, 3, 4, 4)
            # float32 summation orders: the eager layer's encoder GEMMs may run in oneDNN, the program's in matmul
            assert relative_error(loaded.module()(images), model(images)) <= 1e-5


def test_exported_checks_still_refuse_bad_values():
    model = model_with_layer().eval()
    program = torch.export.export(model[2], (torch.rand(2, CHANNELS, 4, 4),))
    maps = torch.rand(2, CHANNELS, 4, 4)
    maps[1, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="acts holds NaN or Inf"):
        program.module()(maps)
