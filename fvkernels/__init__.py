"""fvkernels: FV-VAE Fisher vectors (Qiu, Yao & Mei, CVPR 2017) with fused Triton, CUDA and C++ kernels.

Public API (DESIGN.md §2): fv_accumulate, FVVAEParams, fv_vae_encode, load_official_weights,
to_official_layout, available_backends; selftest (every backend on this machine against the float64 reference). The package's layers, each importing only those below it:
common → ops (the op family and its kernels) → pipeline → nn (the layer) → training → evaluation → app.
"""
from fvkernels.ops import available_backends, fv_accumulate
from fvkernels.ops.verification import selftest
from fvkernels.pipeline import FVVAEParams, fv_vae_encode, load_official_weights, to_official_layout

__version__ = "0.1.0"  # the one version string: pyproject.toml reads it from here

__all__ = ["FVVAEParams", "available_backends", "fv_accumulate", "fv_vae_encode", "load_official_weights",
           "selftest", "to_official_layout"]
