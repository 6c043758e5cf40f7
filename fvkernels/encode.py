"""Kept for earlier import paths: the pipeline lives in fvkernels.pipeline.encode, the normalisation in
fvkernels.common.tensors."""
from fvkernels.pipeline.encode import *  # noqa: F401,F403 (the module moved whole)
from fvkernels.pipeline.encode import encoder_forward


def latent_means(x_hat, params):
    """µ_z of pre-normalised descriptors (…, C) → (…, d): encoder_forward(x_hat, params.encoder)."""
    return encoder_forward(x_hat, params.encoder)
