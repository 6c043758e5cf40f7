"""Kept for earlier import paths (README): descriptor contributions live in fvkernels.evaluation.attention."""
from fvkernels.evaluation.attention import descriptor_contributions

__all__ = ["descriptor_contributions"]
