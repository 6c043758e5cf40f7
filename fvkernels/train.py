"""Kept for earlier import paths (README, DESIGN §2): training lives in fvkernels.training, files in
fvkernels.common.files, the corpus job in fvkernels.app.corpus_training."""
from fvkernels.app.corpus_training import train_on_corpus
from fvkernels.common.files import atomic_save, atomic_write
from fvkernels.training.checkpoint import (
                                          CHECKPOINT_FORMAT,
                                          CHECKPOINT_VERSION,
                                          READABLE_VERSIONS,
                                          check_compatible,
                                          load_checkpoint,
                                          read_checkpoint,
                                          save_checkpoint,
)
from fvkernels.training.data import SetData
from fvkernels.training.loop import train

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "READABLE_VERSIONS", "SetData", "atomic_save", "atomic_write",
           "check_compatible", "load_checkpoint", "read_checkpoint", "save_checkpoint", "train", "train_on_corpus"]
