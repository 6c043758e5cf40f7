"""The fused op and its backends: kernels (csrc/, triton_fv.py), the torch reference, one dispatch point."""
from fvkernels.ops.dispatch import available_backends
from fvkernels.ops.fv_accumulate import fv_accumulate
from fvkernels.ops.reference import fv_accumulate_reference

__all__ = ["available_backends", "fv_accumulate", "fv_accumulate_reference"]
