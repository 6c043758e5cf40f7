"""Kept for earlier import paths (README, DESIGN §2): the video path lives in fvkernels.app.video."""
from fvkernels.app.video import *  # noqa: F401,F403 (the module moved whole)
