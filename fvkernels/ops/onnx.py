"""`fvkernels::fv_accumulate` in standard ONNX operators (onnxscript), for torch.onnx.export(..., dynamo=True).

The translation is the reference's mathematics (DESIGN §1.5–7) as ONNX graph nodes: the decoder GEMM, the
masked residual, the outer-product GEMM and the bias column, then the Fisher scaling, the signed square root and
the per-row sums of squares. It needs the `onnx` extra (onnx, onnxscript; onnxruntime to run the result).

fvkernels' own functions (fv_vae_encode, fv_accumulate, the FVVAE layer) need no table: while torch.onnx.export
traces, they emit the reference's standard operators instead of the op. A model that calls
torch.ops.fvkernels.fv_accumulate itself exports with `custom_translation_table=fvkernels.ops.onnx.translations()`.
"""
from __future__ import annotations

import functools

import torch

from fvkernels.common import extras


@functools.lru_cache(maxsize=None)
def translations() -> dict:
    """{torch op: onnxscript function}, the custom_translation_table of torch.onnx.export."""
    op = extras.load("onnx", "translating fvkernels ops to ONNX", "onnxscript").opset18

    def fv_accumulate(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt=None, lengths=None, x_scale=None,
                      signed_sqrt: bool = False, with_row_sumsq: bool = False, backend: str = "auto"):
        """(N, C, d+1) output and (N, C) float32 row sums of squares ((N, 0) without), as the kernels compute."""
        pre = op.Add(op.MatMul(z, op.Transpose(dec_weight, perm=[1, 0])), dec_bias)  # (N, T, C)
        x_hat = x if x_scale is None else op.Mul(x, op.Unsqueeze(x_scale, [2]))
        zero = op.CastLike(0.0, pre)
        active = op.Greater(pre, zero)
        if lengths is not None:
            set_size = op.Squeeze(op.Shape(z, start=1, end=2), [0])
            positions = op.Range(op.Constant(value_int=0), set_size, op.Constant(value_int=1))
            valid = op.Less(op.Unsqueeze(positions, [0]), op.Unsqueeze(lengths, [1]))  # (N, T)
            active = op.And(active, op.Unsqueeze(valid, [2]))
        residual = op.Where(active, op.Mul(op.Sub(pre, x_hat), inv_sigma2), zero)
        weights = op.MatMul(op.Transpose(residual, perm=[0, 2, 1]), z)  # (N, C, d)
        bias = op.Transpose(op.ReduceSum(residual, [1], keepdims=1), perm=[0, 2, 1])  # (N, C, 1)
        out = op.Concat(weights, bias, axis=2)
        if fisher_rsqrt is not None:
            out = op.Mul(out, fisher_rsqrt)
        if signed_sqrt:
            out = op.Mul(op.Sign(out), op.Sqrt(op.Abs(out)))
        if with_row_sumsq:
            wide = op.Cast(out, to=1)  # FLOAT
            row_sumsq = op.ReduceSum(op.Mul(wide, wide), [2], keepdims=0)
        else:
            empty_shape = op.Concat(op.Shape(z, start=0, end=1), op.Constant(value_ints=[0]), axis=0)
            row_sumsq = op.ConstantOfShape(empty_shape, value=_float32_zero())
        return out, row_sumsq

    return {torch.ops.fvkernels.fv_accumulate.default: fv_accumulate}


def _float32_zero():
    import numpy as np

    numpy_helper = extras.load("onnx", "translating fvkernels ops to ONNX", "onnx.numpy_helper")
    return numpy_helper.from_array(np.zeros(1, dtype=np.float32))
