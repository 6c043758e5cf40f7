"""Kept for earlier import paths: the parameters live in fvkernels.pipeline.params, the official weight file in
fvkernels.pipeline.official."""
from fvkernels.common.tensors import floor_for
from fvkernels.pipeline.official import load_official_weights, to_official_layout
from fvkernels.pipeline.params import FISHER_FLOOR, PRENORMS, SPP_MODES, FVVAEParams

__all__ = ["FISHER_FLOOR", "PRENORMS", "SPP_MODES", "FVVAEParams", "floor_for", "load_official_weights",
           "to_official_layout"]
