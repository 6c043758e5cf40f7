"""Kept for existing imports (README, DESIGN §2): extraction lives in fvkernels.app.extract."""
from fvkernels.app.extract import extract, load_fisher_vectors, read_manifest

__all__ = ["extract", "load_fisher_vectors", "read_manifest"]
