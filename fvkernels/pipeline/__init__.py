"""The FV-VAE pipeline (DESIGN §1): its parameters, the official release's weight file, and fv_vae_encode."""
from fvkernels.pipeline.encode import fv_vae_encode
from fvkernels.pipeline.official import load_official_weights, to_official_layout
from fvkernels.pipeline.params import FVVAEParams

__all__ = ["FVVAEParams", "fv_vae_encode", "load_official_weights", "to_official_layout"]
