"""Kept for earlier import paths (README, DESIGN §2): backbones live in fvkernels.app.backbones and
fvkernels.app.efficientnet."""
from fvkernels.app.backbones import capture_activations, layer_activations
from fvkernels.app.efficientnet import EfficientNetLite0, FeatureLayer, efficientnet_lite0, normalize_images, preprocess

__all__ = ["EfficientNetLite0", "FeatureLayer", "capture_activations", "efficientnet_lite0", "layer_activations",
           "normalize_images", "preprocess"]
