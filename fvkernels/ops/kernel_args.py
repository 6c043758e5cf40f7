"""The one argument object every backend's launcher takes: csrc/fv_accumulate.h's FVAccumulateArgs as tensors."""
from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass
from typing import Optional

from torch import Tensor

from fvkernels.ops.validation import check_kernel_call


@dataclass
class FVAccumulateArgs:
    """One call of the fused kernel (DESIGN §1.5–7; field for field the C++ struct, which adds strides). Made
    only with the structure the kernels rely on (shapes, dtypes, devices, strides; no values are read).

    z (N, T, d) and x (N, T, C) with any strides; dec_weight (C, d) with any strides; dec_bias, inv_sigma2 (C,)
    and fisher_rsqrt (C, d+1) or None, made contiguous here; lengths (N,) int64 in [0, T] or None (all T);
    out (N, C, d+1), each set's block contiguous; x_scale (N, T) or None: x̂ = x_scale ⊙ x, the prenorm folded
    in; signed_sqrt: sign(v)·√|v| at the store; row_sumsq (N, C) float32 or None: Σ_j out[n, c, j]².
    fresh_outputs: out and row_sumsq were just allocated by the caller (the functional ops), so they cannot overlap
    an input and the check of that (a tenth of a small call's host time) is skipped.
    """

    z: Tensor
    x: Tensor
    dec_weight: Tensor
    dec_bias: Tensor
    inv_sigma2: Tensor
    fisher_rsqrt: Optional[Tensor]
    lengths: Optional[Tensor]
    out: Tensor
    x_scale: Optional[Tensor] = None
    signed_sqrt: bool = False
    row_sumsq: Optional[Tensor] = None
    fresh_outputs: InitVar[bool] = False

    def __post_init__(self, fresh_outputs: bool) -> None:
        self.lengths = check_kernel_call(self.z, self.x, self.dec_weight, self.dec_bias, self.inv_sigma2,
                                         self.fisher_rsqrt, self.lengths, self.out, self.x_scale, self.row_sumsq,
                                         check_overlap=not fresh_outputs)
        self.dec_bias = self.dec_bias.contiguous()
        self.inv_sigma2 = self.inv_sigma2.contiguous()
        if self.fisher_rsqrt is not None:
            self.fisher_rsqrt = self.fisher_rsqrt.contiguous()

    @property
    def num_sets(self) -> int:
        return self.z.shape[0]

    @property
    def set_size(self) -> int:
        return self.z.shape[1]

    @property
    def latent(self) -> int:
        return self.z.shape[2]

    @property
    def channels(self) -> int:
        return self.x.shape[2]

    def replace(self, **changes) -> "FVAccumulateArgs":
        return dataclasses.replace(self, **changes)

    def float_inputs(self) -> dict:
        """The floating inputs by name (absent optional ones left out)."""
        names = ("z", "x", "dec_weight", "dec_bias", "inv_sigma2", "fisher_rsqrt", "x_scale")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}
