"""fvkernels: FV-VAE Fisher vectors (Qiu, Yao & Mei, CVPR 2017) with fused Triton, CUDA and C++ kernels."""
from fvkernels.ops import available_backends, fv_accumulate

__version__ = "0.1.0"
__all__ = ["available_backends", "fv_accumulate"]
