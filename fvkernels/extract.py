"""Kept for earlier import paths (README, DESIGN §2): extraction lives in fvkernels.app.extract."""
from fvkernels.app.extract import *  # noqa: F401,F403 (the module moved whole)
