"""Traces fvkernels' ops as torch.compile's AOTAutograd does, on fake CUDA tensors, without a GPU.

Run as `python -m tests.capture_on_stand_in_gpu` outside the Triton interpreter (whose kernels cannot be
captured): triton's driver is replaced by a stand-in for an H100 (its compile target and shared memory), the
only things graph capture asks of it, and the launcher's SM count is fixed. Prints one JSON object per case:
which ops and which Triton kernels the captured forward graph (and the Triton backward op's graph) holds, and
which kernel arguments it treats as written (tests/test_triton_capture.py judges them).
"""
import importlib
import json
import os
import sys

import torch
import triton
from functorch.compile import aot_function
from torch._dynamo.source import ConstantSource
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from triton.backends.compiler import GPUTarget

from fvkernels.ops import triton_fv
from fvkernels.ops.verification import TRUST_VARIABLE

# the module, not the function that fvkernels.ops re-exports under its name
fv_accumulate_module = importlib.import_module("fvkernels.ops.fv_accumulate")

H100_SHARED_MEMORY = 232448
H100_SM_COUNT = 132


class StandInDriver:
    """What capture asks of triton's driver: the compile target (for the kernel's mutation analysis) and the
    device's shared memory (for the launcher's pruning of configs)."""

    def __init__(self):
        self.utils = self

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_device_properties(self, index):
        return {"max_shared_mem": H100_SHARED_MEMORY}


CASES = [
    # name, (N, T, C, d), dtype, with fisher/lengths/x_scale, signed_sqrt, with_row_sumsq, backend, t_splits,
    # whether torch.export (rather than torch.compile) traces, whether N is symbolic (a dynamic batch)
    ("plain", (3, 37, 9, 7), torch.float32, False, False, False, "triton", None, False, False),
    ("epilogue", (4, 50, 17, 7), torch.float32, True, True, True, "triton", None, False, False),
    ("bf16 d-tiled", (2, 40, 64, 300), torch.bfloat16, True, True, True, "auto", None, False, False),
    ("split T", (1, 1250, 64, 31), torch.float16, True, True, True, "triton", 4, False, False),
    ("dynamic batch", (3, 600, 64, 31), torch.float32, True, True, True, "triton", None, False, True),
    ("cuda backend", (3, 37, 9, 7), torch.float32, True, True, True, "cuda", None, False, False),
    ("export", (3, 37, 9, 7), torch.float32, True, True, True, "triton", None, True, False),
]


def capture(shape, dtype, with_extras, signed_sqrt, with_row_sumsq, backend, t_splits, exporting, dynamic_batch):
    num_sets, set_size, channels, latent = shape

    def call(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, x_scale):
        return fv_accumulate_module.fv_accumulate_functional(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt,
                                                             lengths, x_scale, signed_sqrt, with_row_sumsq, backend)

    def inputs(num_sets):
        options = dict(dtype=dtype, device="cuda")
        return [torch.empty(num_sets, set_size, latent, **options), torch.empty(num_sets, set_size, channels, **options),
                torch.empty(channels, latent, **options), torch.empty(channels, **options),
                torch.empty(channels, **options),
                torch.empty(channels, latent + 1, **options) if with_extras else None,
                torch.empty(num_sets, dtype=torch.int64, device="cuda") if with_extras else None,
                torch.empty(num_sets, set_size, **options) if with_extras else None]

    chosen_t_splits, is_exporting = triton_fv.choose_t_splits, torch.compiler.is_exporting
    if t_splits is not None:
        triton_fv.choose_t_splits = lambda *args: t_splits
    torch.compiler.is_exporting = lambda: exporting
    try:
        return captured_graph(call, inputs, num_sets, dynamic_batch)
    finally:
        triton_fv.choose_t_splits, torch.compiler.is_exporting = chosen_t_splits, is_exporting


BACKWARD_CASES = [
    # name, (N, T, C, d), dtype, whether N is symbolic
    ("backward", (3, 37, 9, 7), torch.float32, False),
    ("backward bf16 dynamic batch", (3, 600, 64, 31), torch.bfloat16, True),
]


def capture_backward(shape, dtype, dynamic_batch):
    """The graph of the Triton backward op (fvkernels::fv_accumulate_backward_triton, what the Triton forward's
    autograd calls) as AOTAutograd captures it. The op is traced directly: a training step's backward would run
    autograd's engine on the fake CUDA tensors, which a torch built without CUDA cannot."""
    num_sets, set_size, channels, latent = shape

    def call(*tensors):
        return fv_accumulate_module.fv_accumulate_backward_triton_op(*tensors, [True] * 6)

    def inputs(num_sets):
        options = dict(dtype=dtype, device="cuda")
        return [torch.empty(num_sets, channels, latent + 1, **options), torch.empty(num_sets, set_size, latent, **options),
                torch.empty(num_sets, set_size, channels, **options), torch.empty(channels, latent, **options),
                torch.empty(channels, **options), torch.empty(channels, **options),
                torch.empty(channels, latent + 1, **options), torch.empty(num_sets, dtype=torch.int64, device="cuda"),
                torch.empty(num_sets, set_size, **options)]

    return captured_graph(call, inputs, num_sets, dynamic_batch)


def captured_graph(call, inputs, num_sets: int, dynamic_batch: bool) -> dict:
    """What AOTAutograd captures of call(*inputs(N)) on fake CUDA tensors (N symbolic for a dynamic batch): the
    graph's contents, and its guards on N — a guard would make torch.compile recompile per batch size."""
    graphs = []
    shape_env = ShapeEnv() if dynamic_batch else None

    def compiler(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module

    with FakeTensorMode(shape_env=shape_env):
        if dynamic_batch:
            num_sets = shape_env.create_symintnode(shape_env.create_symbol(num_sets, ConstantSource("N"),
                                                                           dynamic_dim=DimDynamic.DYNAMIC),
                                                   hint=num_sets)
        try:  # running the captured graph needs CUDA; capturing it does not
            aot_function(call, fw_compiler=compiler, dynamic=dynamic_batch)(*inputs(num_sets))
        except RuntimeError as error:
            if not graphs:
                raise
            assert "cuda" in str(error).lower(), error
    (graph,) = graphs
    batch_guards = [] if shape_env is None else [str(guard.expr) for guard in shape_env.guards]
    return dict(**graph_contents(graph), batch_guards=batch_guards)


def graph_contents(graph) -> dict:
    """The fvkernels ops and the Triton kernels a captured graph calls, and the arguments each kernel writes."""
    ops, kernels, written = [], [], []
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            kernels.append(getattr(kernel, "fn", kernel).__name__)
            written.append(sorted(node.kwargs["tensors_to_clone"]))
        elif str(node.target).startswith("fvkernels."):
            ops.append(str(node.target))
    return dict(ops=ops, kernels=kernels, written=written)


def main() -> int:
    os.environ[TRUST_VARIABLE] = "1"  # "auto" takes Triton without running its check (which needs the device)
    triton.runtime.driver.set_active(StandInDriver())
    triton_fv.sm_count = lambda device: H100_SM_COUNT
    triton_fv.device_arch = lambda device: 90
    fv_accumulate_module.tracing = lambda: True  # what torch.compile's Dynamo reports while it traces the caller
    for name, *case in CASES:
        print(json.dumps(dict(case=name, **capture(*case))), flush=True)
    for name, *case in BACKWARD_CASES:
        print(json.dumps(dict(case=name, **capture_backward(*case))), flush=True)
    # The kernels torch finds behind each op (by reading its body), whose sources key its compile caches.
    for case, op in (("cache keys", "fvkernels::fv_accumulate_triton"),
                     ("backward cache keys", "fvkernels::fv_accumulate_backward_triton")):
        found = torch._library.triton.get_triton_kernels_for_op(op)
        print(json.dumps(dict(case=case, kernels=sorted(getattr(kernel, "fn", kernel).__name__ for kernel in found))),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
