"""The op family `fvkernels::fv_accumulate` / `fvkernels::fv_accumulate_out`: the only door to the kernels.

Both take the kernels' whole contract (csrc/fv_accumulate.h): the prenorm folded in as a per-descriptor scale,
the signed square root at the store, and per-row sums of squares for the L2 norm.
- `fv_accumulate` is functional and differentiable: it returns the (N, C, d+1) output and the (N, C) float32
  row sums of squares ((N, 0) when not asked for). Its backward goes through the signed square root and the
  row sums to `fvkernels::fv_accumulate_backward`, the backend's fused backward kernel where it has one
  (dispatch.has_fused_backward: "cpp", "triton", "cuda"), and to the reference's GEMM-shaped torch code otherwise
  (reference.fv_accumulate_backward, also the double backward).
- `fv_accumulate_out` writes into given buffers (a mutating op, `Tensor(a!) out`): inference into a kept
  buffer, and the pipeline's chunked inference.
register_fake makes both traceable by torch.compile and torch.export and checkable by torch.library.opcheck;
FVAccumulateFunction carries the functional op through torch.func's transforms (grad, vmap); the public
functions reach it through fv_accumulate_functional, which picks the form.
The ops trust their arguments: the public entry points (fv_accumulate below, fv_vae_encode) validate once per
call, outside them.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.fx.experimental import proxy_tensor

from fvkernels.common.checks import check_finite, check_finite_tensors, tracing, transformed
from fvkernels.common.tensors import signed_sqrt_derivative
from fvkernels.ops import dispatch
from fvkernels.ops.kernel_args import FVAccumulateArgs
from fvkernels.ops.reference import fv_accumulate_backward, fv_accumulate_outputs
from fvkernels.ops.validation import autocast_target, check_fv_inputs, check_out, compute_dtype


def _empty_outputs(z: Tensor, x: Tensor, with_row_sumsq: bool) -> Tuple[Tensor, Tensor]:
    num_sets, _, latent = z.shape
    channels = x.shape[2]
    out = z.new_empty((num_sets, channels, latent + 1))
    row_sumsq = z.new_empty((num_sets, channels if with_row_sumsq else 0), dtype=torch.float32)
    return out, row_sumsq


@torch.library.custom_op("fvkernels::fv_accumulate", mutates_args=())
def fv_accumulate_op(z: Tensor, x: Tensor, dec_weight: Tensor, dec_bias: Tensor, inv_sigma2: Tensor,
                     fisher_rsqrt: Optional[Tensor], lengths: Optional[Tensor], x_scale: Optional[Tensor],
                     signed_sqrt: bool, with_row_sumsq: bool, backend: str) -> Tuple[Tensor, Tensor]:
    out, row_sumsq = _empty_outputs(z, x, with_row_sumsq)
    dispatch.launch(dispatch.resolve(backend, z.device, z.dtype), FVAccumulateArgs(
        z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, out, x_scale, signed_sqrt,
        row_sumsq if with_row_sumsq else None, fresh_outputs=True))
    return out, row_sumsq


@fv_accumulate_op.register_fake
def _(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, x_scale, signed_sqrt, with_row_sumsq, backend):
    return _empty_outputs(z, x, with_row_sumsq)


# The gradients fv_accumulate_backward_op returns, in its order; those not asked for are empty.
_BACKWARD_GRADS = ("z", "x", "dec_weight", "dec_bias", "inv_sigma2", "x_scale")


@torch.library.custom_op("fvkernels::fv_accumulate_backward", mutates_args=())
def fv_accumulate_backward_op(grad_out: Tensor, z: Tensor, x: Tensor, dec_weight: Tensor, dec_bias: Tensor,
                              inv_sigma2: Tensor, fisher_rsqrt: Optional[Tensor], lengths: Optional[Tensor],
                              x_scale: Optional[Tensor], needs: List[bool], backend: str) -> List[Tensor]:
    """A backend's fused backward (dispatch.has_fused_backward): the gradients of fv_accumulate (before its signed
    square root) w.r.t. _BACKWARD_GRADS given ∂L/∂out, each an empty tensor where `needs` says no."""
    if len(needs) != len(_BACKWARD_GRADS):
        raise ValueError(f"needs must say for each of {', '.join(_BACKWARD_GRADS)} whether its gradient is wanted "
                         f"({len(_BACKWARD_GRADS)} flags), got {len(needs)}")
    # grad_out stands in for the forward's out in the call's structure: the same shape, read instead of written.
    args = FVAccumulateArgs(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, grad_out.contiguous(),
                            x_scale)
    grads = dispatch.launch_backward(dispatch.resolve(backend, z.device, z.dtype), args, grad_out, needs)
    return [z.new_empty(0) if grad is None else grad for grad in grads]


@fv_accumulate_backward_op.register_fake
def _(grad_out, z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, x_scale, needs, backend):
    num_sets, set_size, latent = z.shape
    channels = x.shape[2]
    shapes = [z.shape, x.shape, (channels, latent), (channels,), (channels,), (num_sets, set_size)]
    return [z.new_empty(shape if need else 0) for shape, need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, x_scale, signed_sqrt, with_row_sumsq, backend = inputs
    ctx.signed_sqrt = signed_sqrt
    ctx.backend = backend
    ctx.fused_backward = functools.partial(_backend_backward, backend=backend)
    stored = output[0] if signed_sqrt or with_row_sumsq else None  # what the epilogue's derivatives need
    ctx.save_for_backward(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, x_scale, stored)


def _backward(ctx, grad_out, grad_row_sumsq):
    z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, x_scale, stored = ctx.saved_tensors
    if grad_row_sumsq is not None and grad_row_sumsq.numel():  # Σ_j out² → 2·out
        grad_out = grad_out + 2 * stored * grad_row_sumsq.to(stored.dtype).unsqueeze(-1)
    if ctx.signed_sqrt:
        grad_out = grad_out * signed_sqrt_derivative(stored)
    needs = ctx.needs_input_grad
    needs = needs[:6] + needs[7:8]  # (z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, x_scale)
    grads = _gradients(ctx.backend, ctx.fused_backward, grad_out, z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt,
                       lengths, x_scale, needs)
    return (*grads[:6], None, grads[6], None, None, None)


def _backend_backward(*args, backend: str):
    return fv_accumulate_backward_op(*args, backend)


def _gradients(backend, fused_backward, grad_out, z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths,
               x_scale, needs):
    """The backward's gradients (as reference.fv_accumulate_backward returns them) from the backend's fused kernel
    (through the op fused_backward) where it has one; from the reference's torch code for a double backward (which
    differentiates it), for the Fisher's own gradient (the kernels do not form G unscaled), and for backends
    without one."""
    kernel_needs = [bool(need) for need in needs[:5] + needs[6:]]
    if (torch.is_grad_enabled() or not dispatch.has_fused_backward(dispatch.resolve(backend, z.device, z.dtype))
            or z.shape[0] == 0 or x.shape[2] == 0):
        return fv_accumulate_backward(grad_out, z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths,
                                      x_scale, needs)
    fused = [None] * len(kernel_needs)
    if any(kernel_needs):  # the caller's word, resolved where the op runs, as the forward does
        fused = fused_backward(grad_out, z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, x_scale,
                               kernel_needs)
        fused = [grad if need else None for grad, need in zip(fused, kernel_needs)]
    grad_fisher = None
    if needs[5] and fisher_rsqrt is not None:
        grad_fisher = fv_accumulate_backward(grad_out, z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths,
                                             x_scale, (False,) * 5 + (True, False))[5]
    return (*fused[:5], grad_fisher, fused[5])


fv_accumulate_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_triton_context(ctx, inputs, output):
    _setup_context(ctx, (*inputs, "triton"), output)
    ctx.fused_backward = fv_accumulate_backward_triton_op


def _triton_backward(ctx, grad_out, grad_row_sumsq):
    return _backward(ctx, grad_out, grad_row_sumsq)[:-1]  # no backend argument to answer


def _fv_accumulate_triton(z: Tensor, x: Tensor, dec_weight: Tensor, dec_bias: Tensor, inv_sigma2: Tensor,
                          fisher_rsqrt: Optional[Tensor], lengths: Optional[Tensor], x_scale: Optional[Tensor],
                          signed_sqrt: bool, with_row_sumsq: bool) -> Tuple[Tensor, Tensor]:
    """fv_accumulate_op on the "triton" backend, as an op whose body torch.compile traces: its kernels are launched
    through wrap_triton, so Inductor receives them as Triton kernels rather than an opaque call.
    fv_accumulate_functional takes it while torch.compile traces a call that runs on Triton."""
    out, row_sumsq = _empty_outputs(z, x, with_row_sumsq)
    # Called by its plain name: torch finds the kernels behind a triton_op by reading its body's calls, and keys its
    # compile caches on their sources.
    launch_triton(FVAccumulateArgs(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, out, x_scale,
                                   signed_sqrt, row_sumsq if with_row_sumsq else None, fresh_outputs=True),
                  capturable=True)
    return out, row_sumsq


def _fv_accumulate_backward_triton(grad_out: Tensor, z: Tensor, x: Tensor, dec_weight: Tensor, dec_bias: Tensor,
                                   inv_sigma2: Tensor, fisher_rsqrt: Optional[Tensor], lengths: Optional[Tensor],
                                   x_scale: Optional[Tensor], needs: List[bool]) -> List[Tensor]:
    """fv_accumulate_backward_op on the "triton" backend as an op whose body torch.compile traces (the backward of
    fv_accumulate_triton_op): Inductor receives the backward's Triton kernels too."""
    args = FVAccumulateArgs(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, grad_out.contiguous(),
                            x_scale)
    grads = backward_triton(args, grad_out, needs, capturable=True)  # by its plain name, as launch_triton above
    return [z.new_empty(0) if grad is None else grad for grad in grads]


# Defined where triton is installed: the ops are taken only for calls that run on it, and torch logs a warning at
# every import when a triton_op is defined without triton.
fv_accumulate_triton_op = fv_accumulate_backward_triton_op = None
if importlib.util.find_spec("triton") is not None:
    from fvkernels.ops.triton_fv import backward as backward_triton
    from fvkernels.ops.triton_fv import launch as launch_triton

    fv_accumulate_triton_op = torch.library.triton_op("fvkernels::fv_accumulate_triton",
                                                      mutates_args=())(_fv_accumulate_triton)
    fv_accumulate_triton_op.register_autograd(_triton_backward, setup_context=_setup_triton_context)
    fv_accumulate_backward_triton_op = torch.library.triton_op("fvkernels::fv_accumulate_backward_triton",
                                                               mutates_args=())(_fv_accumulate_backward_triton)

# Whether torch.compile may capture the Triton kernels: triton is installed, and Inductor passes a captured kernel its
# inputs with the strides seen while tracing (its "eager input values", newer torch releases); older ones could pad
# an intermediate after the capture fixed its strides in the launch (pytorch#147828): there calls keep the opaque op.
_TRITON_CAPTURE = fv_accumulate_triton_op is not None and hasattr(proxy_tensor, "_should_save_eager_input_vals")


class FVAccumulateFunction(torch.autograd.Function):
    """`fvkernels::fv_accumulate` with the same forward and backward as an autograd.Function, the form torch.func
    composes with (grad, vjp, jacrev, vmap), which the op's own autograd registration does not."""

    @staticmethod
    def forward(*args):
        return fv_accumulate_op(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)

    @staticmethod
    def vmap(info, in_dims, *args):
        """A batch over the per-set inputs (z, x, lengths, x_scale) joins the set axis: one call of B·N sets. A batch
        over the decoder's parameters runs one call per batch entry."""
        per_set = {0, 1, 6, 7}
        batched = {index for index, dim in enumerate(in_dims) if dim is not None}
        if batched <= per_set:
            def join(index, value):
                if value is None or in_dims[index] is None:
                    return value if value is None or index not in per_set else value.expand(info.batch_size,
                                                                                           *value.shape)
                return value.movedim(in_dims[index], 0)
            joined = [join(index, value) for index, value in enumerate(args)]
            flat = [value.flatten(0, 1) if index in per_set and value is not None else value
                    for index, value in enumerate(joined)]
            out, row_sumsq = FVAccumulateFunction.apply(*flat)
            return (out.unflatten(0, (info.batch_size, -1)), row_sumsq.unflatten(0, (info.batch_size, -1))), (0, 0)
        results = [FVAccumulateFunction.apply(*[value if in_dims[index] is None else value.select(in_dims[index], entry)
                                                for index, value in enumerate(args)])
                   for entry in range(info.batch_size)]
        return (torch.stack([out for out, _ in results]), torch.stack([sums for _, sums in results])), (0, 0)


def fv_accumulate_functional(*args) -> Tuple[Tensor, Tensor]:
    """The functional op with its autograd, in the form each caller's context takes: inside torch.func transforms
    the autograd.Function; while torch.onnx.export traces, the reference's standard operators, which the exporter
    translates without being told about fvkernels (a graph that calls the op itself needs
    fvkernels.ops.onnx.translations()); elsewhere (eager, torch.compile, torch.export) the registered op."""
    if torch.onnx.is_in_onnx_export():
        out, row_sumsq = fv_accumulate_outputs(*args[:-1])
        return out, row_sumsq if row_sumsq is not None else out.new_empty((out.shape[0], 0), dtype=torch.float32)
    if transformed():
        return FVAccumulateFunction.apply(*args)
    if _compiles_on_triton(args[0], args[-1]):
        return fv_accumulate_triton_op(*args[:-1])
    return fv_accumulate_op(*args)


def _compiles_on_triton(z: Tensor, backend: str) -> bool:
    """Whether torch.compile is tracing a call that runs on the Triton backend, on a GPU. Not torch.export, whose
    graph keeps the backend-neutral op (and the caller's backend word) so that it runs wherever it is loaded."""
    if not (tracing() and _TRITON_CAPTURE and z.is_cuda and backend in ("auto", "triton")):  # eager: one call
        return False
    if dispatch.triton_interpreted() or torch.compiler.is_exporting():
        return False
    return dispatch.resolve(backend, z.device, compute_dtype(z.dtype, z.device)) == "triton"


# The out-variant is called once per chunk of sets in inference loops. torch.library.custom_op's Python wrappers
# (argument defaults, autograd and view bookkeeping) cost ~60 µs a call on this CPU, 5% of the pipeline at T=784;
# the plain registration costs ~5 µs, and the dispatcher's fallbacks still bump `out`'s version counter.
_LIBRARY = torch.library.Library("fvkernels", "FRAGMENT")
_LIBRARY.define(
    "fv_accumulate_out(Tensor z, Tensor x, Tensor dec_weight, Tensor dec_bias, Tensor inv_sigma2, "
    "Tensor? fisher_rsqrt, Tensor? lengths, Tensor? x_scale, bool signed_sqrt, str backend, Tensor(a!) out, "
    "Tensor(b!)? row_sumsq) -> ()")


def _fv_accumulate_out(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, x_scale, signed_sqrt, backend,
                       out, row_sumsq) -> None:
    dispatch.launch(dispatch.resolve(backend, z.device, z.dtype), FVAccumulateArgs(
        z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, out, x_scale, signed_sqrt, row_sumsq))


_LIBRARY.impl("fv_accumulate_out", _fv_accumulate_out, "CompositeExplicitAutograd")


@torch.library.register_fake("fvkernels::fv_accumulate_out", lib=_LIBRARY)
def _(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, x_scale, signed_sqrt, backend, out, row_sumsq):
    return None


fv_accumulate_out_op = torch.ops.fvkernels.fv_accumulate_out.default


# ---- autocast: one compute dtype for the inputs, fp32 accumulation in the kernels ------------------------------

def _register_autocast(op: torch._ops.OpOverload, device_type: str) -> None:
    """Inside torch.autocast(device_type), the op casts its floating inputs (float64 aside) to one dtype and runs
    below autocast: the functional op to validation.autocast_target (bfloat16, or float32 for a float16 autocast;
    its output has that dtype); the out-variant to its buffer's dtype. The row sums of squares stay float32."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    below_autocast = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))
    writes_out = op is fv_accumulate_out_op

    def cast_and_run(keyset, *args):
        target = args[10].dtype if writes_out else autocast_target(device_type)
        inputs = [value.to(target) if index < 10 and isinstance(value, Tensor) and value.is_floating_point()
                  and value.dtype != torch.float64 else value for index, value in enumerate(args)]
        with torch._C._ExcludeDispatchKeyGuard(below_autocast):
            return op(*inputs)

    _LIBRARY.impl(op._opname, cast_and_run, key_name, with_keyset=True)


_WITH_AUTOCAST = [fv_accumulate_op._opoverload, fv_accumulate_out_op] + (
    [] if fv_accumulate_triton_op is None else [fv_accumulate_triton_op._opoverload])
for _op in _WITH_AUTOCAST:
    for _device_type in ("cpu", "cuda"):
        _register_autocast(_op, _device_type)


def fv_accumulate(z: Tensor, x: Tensor, dec_weight: Tensor, dec_bias: Tensor, inv_sigma2: Tensor,
                  fisher_rsqrt: Optional[Tensor] = None, lengths: Union[Tensor, Sequence[int], None] = None,
                  *, backend: str = "auto", out: Optional[Tensor] = None) -> Tensor:
    """Raw FV-VAE Fisher vectors of N descriptor sets (DESIGN §1.5–6), (N, C, d+1), bias column last.

    z (N, T, d) latent means, x (N, T, C) pre-normalised descriptors, dec_weight (C, d), dec_bias (C,),
    inv_sigma2 (C,) = 1/σx², fisher_rsqrt (C, d+1) or None, lengths (N,) valid descriptors per set
    (or None: all T). backend: "auto", "triton", "cuda", "cpp" or "torch" (see available_backends()).
    Differentiable w.r.t. every floating input. out: an (N, C, d+1) buffer to write into, for inference
    loops — a fresh 100 MB+ output costs a page fault per 4 KB on first touch, which at small T takes
    longer than the arithmetic; with out= nothing is recorded for autograd.
    """
    lengths = check_fv_inputs(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths)
    inputs = dict(z=z, x=x, dec_weight=dec_weight, dec_bias=dec_bias, inv_sigma2=inv_sigma2, fisher_rsqrt=fisher_rsqrt)
    check_finite_tensors(inputs, "fv_accumulate's inputs must be finite")
    # Checks the choice now (and runs auto's check of a GPU kernel); the op gets the caller's word and resolves it
    # where it runs, so that an exported graph is not tied to this machine's backend.
    dispatch.resolve(backend, z.device, compute_dtype(z.dtype, z.device, out))
    arguments = (z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, None, False)
    # The row sums of squares (C per set, from the kernels' epilogue) witness the output's finiteness for the check
    # below, which otherwise would read the whole (N, C, d+1) output again; they are float32, too narrow for float64.
    # Not when autograd records the call: the row sums would be a differentiable output, their backward would keep
    # the result alive and forbid modifying it in place, and training reads the result once more anyway.
    records_autograd = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs.values())
    with_row_sumsq = (not records_autograd and z.dtype != torch.float64
                      and compute_dtype(z.dtype, z.device, out) != torch.float64)
    if out is None:
        result, row_sumsq = fv_accumulate_functional(*arguments, with_row_sumsq, backend)
    else:
        check_out(out, (z.shape[0], x.shape[2], z.shape[2] + 1), z, dict(inputs, lengths=lengths))
        if tracing() or transformed():  # captured graphs and transforms stay functional: one op to translate
            result, row_sumsq = fv_accumulate_functional(*arguments, with_row_sumsq, backend)
            result = out.copy_(result)
        else:
            row_sumsq = z.new_empty((z.shape[0], x.shape[2] if with_row_sumsq else 0), dtype=torch.float32)
            fv_accumulate_out_op(*arguments, backend, out, row_sumsq if with_row_sumsq else None)
            result = out
    check_finite(result, lambda sets: f"the Fisher vectors of {'some sets' if sets is None else f'sets {sets}'} "
                 f"overflowed {result.dtype} although the inputs are finite (the sums grow with T and x²/σx²); scale "
                 "x down, or compute in float64", witness=row_sumsq if with_row_sumsq else None)
    return result
