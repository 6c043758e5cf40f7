"""Training the FV-VAE layer: the sets in memory (data), the checkpoint format (checkpoint) and the loop of
Algorithm 1 (loop)."""
from fvkernels.training.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from fvkernels.training.data import SetData
from fvkernels.training.loop import train

__all__ = ["SetData", "load_checkpoint", "read_checkpoint", "save_checkpoint", "train"]
