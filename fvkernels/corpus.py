"""Kept for earlier import paths: corpora live in fvkernels.app.corpus, backbones in fvkernels.app.backbones."""
from fvkernels.app.corpus import *  # noqa: F401,F403 (the module moved whole)
