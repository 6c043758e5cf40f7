"""Loads the compiled module and turns tensors into its framework-agnostic argument struct."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

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


def kernel_args(z: Tensor, x: Tensor, dec_weight: Tensor, dec_bias: Tensor, inv_sigma2: Tensor,
                fisher_rsqrt: Optional[Tensor], lengths: Optional[Tensor], out: Tensor, *,
                x_scale: Optional[Tensor] = None, signed_sqrt: bool = False,
                row_sumsq: Optional[Tensor] = None):
    """Fills FVAccumulateArgs (csrc/fv_accumulate.h). The small per-channel tensors must already be
    contiguous; z, x, x_scale and dec_weight may have any strides."""
    args = extension().FVAccumulateArgs()
    args.num_sets, args.set_size, args.latent = z.shape
    args.channels = x.shape[2]
    args.dtype = _DTYPES[z.dtype]
    args.z, args.z_stride = z.data_ptr(), z.stride()
    args.x, args.x_stride = x.data_ptr(), x.stride()
    if x_scale is not None:
        args.x_scale, args.x_scale_stride = x_scale.data_ptr(), x_scale.stride()
    args.dec_weight, args.w_stride = dec_weight.data_ptr(), dec_weight.stride()
    args.dec_bias = dec_bias.data_ptr()
    args.inv_sigma2 = inv_sigma2.data_ptr()
    if fisher_rsqrt is not None:
        args.fisher_rsqrt = fisher_rsqrt.data_ptr()
    if lengths is not None:
        args.lengths = lengths.data_ptr()
    args.out, args.out_stride_n = out.data_ptr(), out.stride(0)
    args.signed_sqrt = signed_sqrt
    if row_sumsq is not None:
        args.row_sumsq = row_sumsq.data_ptr()
    return args
