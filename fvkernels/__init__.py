"""fvkernels: FV-VAE Fisher vectors (Qiu, Yao & Mei, CVPR 2017) with fused Triton, CUDA and C++ kernels.

Public API (DESIGN.md §2): fv_accumulate, FVVAEParams, fv_vae_encode, load_official_weights,
to_official_layout, available_backends.
"""
from fvkernels.encode import fv_vae_encode
from fvkernels.ops import available_backends, fv_accumulate
from fvkernels.params import FVVAEParams, load_official_weights, to_official_layout

__version__ = "0.1.0"
__all__ = ["FVVAEParams", "available_backends", "fv_accumulate", "fv_vae_encode", "load_official_weights",
           "to_official_layout"]
