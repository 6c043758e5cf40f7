"""argparse types and help texts shared by the commands of the CLI (fvkernels.app.cli, fvkernels.app.demo)."""
from __future__ import annotations

import argparse
import functools
import math


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default (required options have none to show)."""

    def _get_help_string(self, action):
        return action.help if action.required else super()._get_help_string(action)


def positive_int(text: str) -> int:
    """argparse type of counts and sizes: refused here, 0 or less would fail only after work was done or
    --out was claimed."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# Larger images are of no use to a CNN trained at 224 px, and one alone needs gigabytes of activations; smaller
# sizes that do not fit are refused by the memory check before the first batch (fvkernels.app.corpus)
MAX_IMAGE_SIZE = 4096


def image_size(text: str) -> int:
    """argparse type of --image-size: a side length in pixels, 1 … MAX_IMAGE_SIZE."""
    value = positive_int(text)
    if value > MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"expected an image size from 1 to {MAX_IMAGE_SIZE} pixels, got {value}")
    return value


def efficientnet_layer(text: str) -> str:
    """argparse type of --layer: one of EfficientNet-Lite0's feature taps."""
    if text not in efficientnet_layer_names():
        raise argparse.ArgumentTypeError(f"{text!r} is not an EfficientNet-Lite0 feature layer; choose one of "
                                         f"{', '.join(efficientnet_layer_names())}")
    return text


@functools.lru_cache(maxsize=1)
def efficientnet_layer_names() -> tuple:
    from fvkernels.app.efficientnet import EfficientNetLite0

    return tuple(layer.name for layer in EfficientNetLite0().feature_layers())


def layer_help(what: str) -> str:
    return (f"{what}; post-activation taps (≥ 0, what FV-VAE's ReLU decoder models) are stem, head and the "
            f".expanded/.depthwise ones. Valid names: {', '.join(efficientnet_layer_names())}")


def non_negative_float(text: str) -> float:
    """argparse type of a rate or weight: a finite number ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number ≥ 0, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type of a count that may be 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 0, got {text!r}")
    return value
