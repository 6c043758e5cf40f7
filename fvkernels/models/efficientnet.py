"""Kept for earlier import paths: EfficientNet-Lite0 lives in fvkernels.app.efficientnet."""
from fvkernels.app.efficientnet import *  # noqa: F401,F403 (the module moved whole)
