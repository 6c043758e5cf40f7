"""Loads the compiled module and turns a call's FVAccumulateArgs into its framework-agnostic struct."""
from __future__ import annotations

from typing import Optional

import torch

from fvkernels.ops.kernel_args import FVAccumulateArgs

BUILD_HINT = ("build it with `make install` (or `pip install -e . --no-build-isolation`) from the fvkernels "
              "source tree; the CUDA kernel needs nvcc on PATH at build time (FVK_CUDA=1 to insist)")

try:
    from fvkernels import _C
    IMPORT_ERROR: Optional[str] = None
except ImportError as error:  # the package stays usable with the "torch" (and "triton") backends
    _C = None
    # A missing module reads as a circular import in Python's words; a present one that fails to load
    # (another Python, a missing CUDA runtime) keeps the loader's message.
    IMPORT_ERROR = ("this installation has no compiled fvkernels._C" if "cannot import name '_C'" in str(error)
                    else f"fvkernels._C failed to load: {error}")

_DTYPES = {}
if _C is not None:
    _DTYPES = {torch.float32: _C.DType.float32, torch.float64: _C.DType.float64,
               torch.bfloat16: _C.DType.bfloat16, torch.float16: _C.DType.float16}


def extension():
    """The compiled module, or RuntimeError saying how to build it."""
    if _C is None:
        raise RuntimeError(f"the fvkernels C++/CUDA extension is not built ({IMPORT_ERROR}); {BUILD_HINT}")
    return _C


def kernel_struct(args: FVAccumulateArgs):
    """The compiled module's FVAccumulateArgs (csrc/fv_accumulate.h) for a call: pointers and element strides."""
    struct = extension().FVAccumulateArgs()
    struct.num_sets, struct.set_size, struct.latent = args.z.shape
    struct.channels = args.channels
    struct.dtype = _DTYPES[args.z.dtype]
    struct.z, struct.z_stride = args.z.data_ptr(), args.z.stride()
    struct.x, struct.x_stride = args.x.data_ptr(), args.x.stride()
    if args.x_scale is not None:
        struct.x_scale, struct.x_scale_stride = args.x_scale.data_ptr(), args.x_scale.stride()
    struct.dec_weight, struct.w_stride = args.dec_weight.data_ptr(), args.dec_weight.stride()
    struct.dec_bias = args.dec_bias.data_ptr()
    struct.inv_sigma2 = args.inv_sigma2.data_ptr()
    if args.fisher_rsqrt is not None:
        struct.fisher_rsqrt = args.fisher_rsqrt.data_ptr()
    if args.lengths is not None:
        struct.lengths = args.lengths.data_ptr()
    struct.out, struct.out_stride_n = args.out.data_ptr(), args.out.stride(0)
    struct.signed_sqrt = args.signed_sqrt
    if args.row_sumsq is not None:
        struct.row_sumsq = args.row_sumsq.data_ptr()
    return struct


GRADIENT_FIELDS = ("grad_z", "grad_x", "grad_weight", "grad_bias", "grad_inv_sigma2", "grad_x_scale")


def backward_struct(args: FVAccumulateArgs, grad_out: torch.Tensor, needs) -> tuple:
    """The compiled module's FVAccumulateBackwardArgs for the backward of a forward call, and the gradients it will
    write (new contiguous tensors in the forward's dtype, None where `needs` says no), in GRADIENT_FIELDS order."""
    z, x = args.z, args.x
    num_sets, set_size, latent = z.shape
    channels = x.shape[2]
    shapes = [z.shape, x.shape, (channels, latent), (channels,), (channels,), (num_sets, set_size)]
    grads = [z.new_empty(shape) if need else None for shape, need in zip(shapes, needs)]
    struct = extension().FVAccumulateBackwardArgs()
    struct.forward = kernel_struct(args)
    struct.grad_out, struct.grad_out_stride_n = grad_out.data_ptr(), grad_out.stride(0)
    for name, grad in zip(GRADIENT_FIELDS, grads):
        if grad is not None:
            setattr(struct, name, grad.data_ptr())
    return struct, grads
