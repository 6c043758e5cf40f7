"""Kept for existing imports (README, DESIGN §2): training lives in fvkernels.training."""
from fvkernels.training import SetData, load_checkpoint, read_checkpoint, save_checkpoint, train

__all__ = ["SetData", "load_checkpoint", "read_checkpoint", "save_checkpoint", "train"]
