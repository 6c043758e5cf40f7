"""argparse types and help texts shared by the commands of the CLI (fvkernels.app.cli, fvkernels.app.demo)."""
from __future__ import annotations

import argparse
import functools


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


def fraction(text: str) -> float:
    """argparse type of a share in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value
