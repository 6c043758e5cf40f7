"""What a user feels: images per second from pixels to Fisher vectors (EfficientNet-Lite0 + fv_vae_encode), and one
fine-tuning step of the backbone's top block through the layer, in float32 and under bfloat16 autocast, with the
fused kernels against the torch composite ("torch" backend). Random weights: the timings do not depend on them."""
from dataclasses import dataclass

import pytest
import torch

from fvkernels import fv_vae_encode
from fvkernels.app.efficientnet import efficientnet_lite0
from fvkernels.nn import FVVAE

from bench.cases import USER_CASES
from bench.measure import TOLERANCE, relative_error
from bench.providers import Provider

NUM_CLASSES = 10
IMAGE_SIZE = 224
TOP_BLOCK = 15  # block15 and the head are fine-tuned; the blocks below stay frozen


@dataclass(frozen=True)
class Setting:
    name: str  # as the tables show it
    backend: str  # the layer's / fv_vae_encode's backend
    autocast: bool  # bfloat16 autocast on the CPU

    @property
    def dtype(self):
        return torch.bfloat16 if self.autocast else torch.float32

    @property
    def provider(self) -> Provider:
        return Provider(self.name, "cpu", self.backend, self.dtype)

    def context(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast)


SETTINGS = (Setting("torch", "torch", False), Setting("cpp", "cpp", False), Setting("torch-bf16-autocast", "torch", True),
            Setting("cpp-bf16-autocast", "cpp", True))


def images(case, full):
    size = IMAGE_SIZE if full else 64
    return torch.rand(case.sets, 3, size, size, generator=torch.Generator().manual_seed(0))


def layer_for(case, full, backend):
    torch.manual_seed(0)
    latent = case.latent if full else 8
    layer = FVVAE(1280, latent, (512 if full else 16,), num_classes=NUM_CLASSES, backend=backend)
    layer.fit_fisher([torch.rand(4, 1280, 2, 2)])
    return layer


def frozen_and_top(backbone):
    """The frozen part (stem, blocks 0…14) and the fine-tuned top (block15, head) of EfficientNet-Lite0."""
    frozen = torch.nn.Sequential(backbone.stem, *backbone.blocks[:TOP_BLOCK]).requires_grad_(False)
    top = torch.nn.Sequential(*backbone.blocks[TOP_BLOCK:], backbone.head)
    return frozen, top


def record(benchmark, bench, case, setting, fn):
    benchmark.group = f"{case.group} [cpu]"
    benchmark.extra_info.update(
        provider=setting.name, device="cpu", dtype=str(setting.dtype).replace("torch.", ""), operation=case.operation,
        case=case.key, sets=case.sets, set_size=case.set_size, channels=case.channels, latent=case.latent,
        descriptors=case.sets * case.set_size, scaling=False, flops=None, bytes=0)
    benchmark(fn)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_pixels_to_fisher_vectors(benchmark, bench, setting):
    bench.require(setting.provider)
    case = USER_CASES[0]
    backbone = efficientnet_lite0(pretrained=False)
    pixels = images(case, bench.full)
    params = layer_for(case, bench.full, setting.backend).eval().to_params()

    def encode():
        with torch.no_grad(), setting.context():
            return fv_vae_encode(backbone.features(pixels, "head")["head"], params, backend=setting.backend)

    out = encode()
    with torch.no_grad(), setting.context():  # the composite at the same precision
        expected = fv_vae_encode(backbone.features(pixels, "head")["head"], params, backend="torch")
    error = relative_error(out.float() * out.float().abs(), expected.float() * expected.float().abs())
    assert error <= TOLERANCE[setting.dtype], f"{setting.name} differs from the composite by {error:.2e}"
    benchmark.extra_info["first_call_s"] = 0.0
    record(benchmark, bench, case, setting, encode)


def fine_tuning_setup(case, full, backend, dtype=torch.float32):
    """(step, head conv weight) of one fine-tuning step: block15 + head + the layer + a linear classifier on the
    frozen blocks' maps (computed once)."""
    torch.manual_seed(0)
    frozen, top = frozen_and_top(efficientnet_lite0(pretrained=False).train())
    layer = layer_for(case, full, backend).eval()  # a fitted Fisher, no dropout: a fixed target
    classifier = torch.nn.Linear(layer.output_dim, NUM_CLASSES)
    with torch.no_grad():
        below = frozen(images(case, full))
    top, layer, classifier, below = (part.to(dtype) for part in (top, layer, classifier, below))
    labels = torch.arange(case.sets) % NUM_CLASSES
    trained = [*top.parameters(), *layer.parameters(), *classifier.parameters()]

    def step(context):
        for parameter in trained:
            parameter.grad = None
        with context:
            logits = classifier(layer(top(below)))
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        return loss.detach()
    return step, top[-1].conv.weight


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_fine_tuning_step(benchmark, bench, setting):
    bench.require(setting.provider)
    case = USER_CASES[1]
    step, weight = fine_tuning_setup(case, bench.full, setting.backend)
    loss = step(setting.context())
    if not setting.autocast:
        # Judged against float64 next to the float32 composite's own error (flash-attention's rule): the signed
        # square root makes the backbone's gradient sensitive to rounding (≈5% between two float32 runs here).
        truth_step, truth_weight = fine_tuning_setup(case, bench.full, "torch", torch.float64)
        expected_loss = truth_step(setting.context())
        composite_step, composite_weight = fine_tuning_setup(case, bench.full, "torch")
        composite_step(setting.context())
        error, composite_error = (relative_error(w.grad, truth_weight.grad) for w in (weight, composite_weight))
        assert error <= 2 * composite_error + 1e-4, f"the backbone's gradient differs by {error:.2e}"
    else:  # under bf16 autocast the backbone's gradient is rounding noise of its own: only the loss compares
        expected_loss = fine_tuning_setup(case, bench.full, "torch")[0](setting.context())
    assert relative_error(loss, expected_loss) <= TOLERANCE[setting.dtype]
    benchmark.extra_info["first_call_s"] = 0.0
    record(benchmark, bench, case, setting, lambda: step(setting.context()))
