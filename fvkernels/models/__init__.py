"""CNN backbones that give the local descriptors FV-VAE encodes, and a hook to tap any torch CNN.

- `efficientnet_lite0`: EfficientNet-Lite0 with ImageNet weights; its `features(images, layers)`
  returns named (N, C, H, W) maps (see fvkernels.models.efficientnet).
- `layer_activations(model, layer_name, images)`: the output of a named submodule of any nn.Module
  (torchvision, timm, your own), the forward stopped right after it.
- `capture_activations(model, *layer_names)`: a context manager for several layers of one full forward.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Dict, Iterator

from torch import Tensor, nn

from fvkernels.models.efficientnet import (EfficientNetLite0, FeatureLayer, efficientnet_lite0, normalize_images,
                                           preprocess)

__all__ = ["EfficientNetLite0", "FeatureLayer", "capture_activations", "efficientnet_lite0", "layer_activations",
           "normalize_images", "preprocess"]


class _Captured(Exception):
    """Raised by the hook of `layer_activations` to stop the forward once the layer has run."""


def _named_module(model: nn.Module, layer_name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer_name not in modules or layer_name == "":
        close = difflib.get_close_matches(layer_name, [name for name in modules if name], n=5)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"{type(model).__name__} has no submodule {layer_name!r}{hint} "
                         "(print(model) or [n for n, _ in model.named_modules()] lists them)")
    return modules[layer_name]


def _as_maps(output, layer_name: str) -> Tensor:
    if not isinstance(output, Tensor) or output.dim() != 4:
        what = f"shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"layer {layer_name!r} produced {what}, not a (N, C, H, W) feature map; "
                         "tap a convolution, activation or pooling layer")
    return output


def layer_activations(model: nn.Module, layer_name: str, images: Tensor) -> Tensor:
    """(N, C, H, W) output of the submodule `layer_name` (a name from model.named_modules(), e.g.
    "features.35" for torchvision's VGG-19 conv5_4 + ReLU or "layer4" for a ResNet) when `model`
    runs on `images`.

    The forward stops right after that layer, which saves the rest of the network and means a later
    in-place operation (torchvision's ReLU(inplace=True) after a conv) cannot alter the result. Runs in
    the model's current mode (call model.eval() for inference) and records autograd as usual.
    """
    module = _named_module(model, layer_name)
    captured = []

    def hook(_module, _inputs, output):
        captured.append(_as_maps(output, layer_name))
        raise _Captured

    handle = module.register_forward_hook(hook)
    try:
        model(images)
    except _Captured:
        return captured[0]
    finally:
        handle.remove()
    hint = "tap a layer on the path from input to output"
    if hasattr(model, "features") and hasattr(model, "feature_layers"):  # fvkernels' own backbones
        hint = (f"{type(model).__name__} runs its blocks' parts without their forward, so hooks on them stay silent: "
                f"use model.features(images, name) with a name from model.feature_layers(), e.g. 'block5.depthwise'")
    raise RuntimeError(f"the forward of {type(model).__name__} never ran submodule {layer_name!r}; {hint}")


@contextmanager
def capture_activations(model: nn.Module, *layer_names: str) -> Iterator[Dict[str, Tensor]]:
    """Inside the block, each forward of `model` stores the (N, C, H, W) outputs of the named
    submodules in the yielded dict (the last call wins). The maps are copied as they are produced, so
    in-place operations later in the forward do not change them.

        with capture_activations(model, "layer3", "layer4") as maps:
            model(images)
        maps["layer4"]  # (N, 2048, 7, 7)
    """
    if not layer_names:
        raise ValueError("name at least one layer to capture")
    maps: Dict[str, Tensor] = {}

    def hook_for(name):
        def hook(_module, _inputs, output):
            maps[name] = _as_maps(output, name).clone()
        return hook

    handles = [_named_module(model, name).register_forward_hook(hook_for(name)) for name in layer_names]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()
