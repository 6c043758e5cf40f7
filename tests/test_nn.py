"""The FVVAE layer: forward/backbone gradients, losses of Algorithm 1, Fisher buffer, official weights."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fvkernels import fv_vae_encode, load_official_weights
from fvkernels.nn import FVVAE

from tests.helpers import relative_error, write_official_mat


def small_layer(**kwargs):
    options = dict(latent_dim=4, hidden=(8,), num_classes=3)
    options.update(kwargs)
    return FVVAE(6, **options)


def test_forward_matches_fv_vae_encode_and_trains_the_backbone():
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
    layer = small_layer().eval()
    images = torch.rand(4, 3, 5, 5)
    fv = layer(backbone(images))
    assert fv.shape == (4, 6 * 5)
    with torch.no_grad():
        assert relative_error(fv, fv_vae_encode(backbone(images), layer.to_params())) <= 1e-5
    fv.sum().backward()
    assert backbone[0].weight.grad is not None and backbone[0].weight.grad.abs().sum() > 0
    assert layer.decoder.weight.grad is not None and layer.encoder[0].weight.grad.abs().sum() > 0


def test_eval_forward_is_one_graph_and_reads_no_values(monkeypatch):
    """The layer's parameters are not re-validated per forward (σx > 0 holds by construction): a forward reads
    nothing back from the device but the input check, and compiles into one graph equal to eager."""
    layer = small_layer().eval()
    acts = torch.rand(5, 6, 4, 3)
    layer.fit_fisher([acts])

    def fail(params):
        raise AssertionError("the forward re-validated the parameters")
    monkeypatch.setattr("fvkernels.pipeline.params.FVVAEParams._check_values", fail)
    monkeypatch.setattr("fvkernels.pipeline.params.FVVAEParams._check_structure", fail)
    with torch.no_grad():
        expected = layer(acts)
        assert torch._dynamo.explain(layer)(acts).graph_break_count == 0
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        assert relative_error(compiled(acts), expected) <= 1e-6
    assert torch._dynamo.explain(layer)(acts.requires_grad_()).graph_break_count == 0


def test_loss_terms_follow_algorithm_1():
    layer = small_layer(prenorm=None, dropout=0.0)
    acts = torch.rand(3, 7, 6)
    lengths = torch.tensor([7, 2, 5])
    labels = torch.tensor([0, 2, 1])
    torch.manual_seed(5)
    losses = layer.loss(acts, labels, lengths)
    torch.manual_seed(5)
    eps = torch.randn(3, 7, 4)  # the draw the layer makes for z = µz + ε ⊙ σz
    expected = {"rec": 0.0, "reg": 0.0, "cls": 0.0}
    sigma_x, sigma_z = layer.sigma_x(), layer.log_sigma_z.exp()
    for n in range(3):
        x = acts[n, : lengths[n]]
        mu_z = layer.encoder[1](F.relu(layer.encoder[0](x)))
        z = mu_z + eps[n, : lengths[n]] * sigma_z
        mu_x = F.relu(layer.decoder(z))
        expected["rec"] += (((x - mu_x) / sigma_x) ** 2).sum() / 2 + len(x) * sigma_x.log().sum()
        expected["reg"] += 0.5 * (mu_z ** 2 + sigma_z ** 2 - 1 - 2 * layer.log_sigma_z).sum()
        scores = layer.classifier(z).max(0).values
        expected["cls"] += F.cross_entropy(scores[None], labels[n: n + 1])
    for name in expected:
        assert torch.isclose(losses[name], expected[name] / 3, rtol=1e-5), name
    assert torch.isclose(losses["total"], losses["rec"] + losses["reg"] + 1e3 * losses["cls"], rtol=1e-6)


def test_fv_vae_minus_has_no_classification_term():
    layer = FVVAE(6, 4, (8,))
    assert layer.classifier is None and layer.lambda_cls == 0
    losses = layer.loss(torch.rand(2, 6, 3, 3))
    assert losses["cls"] == 0 and torch.isclose(losses["total"], losses["rec"] + losses["reg"])
    with pytest.raises(ValueError, match="lambda_cls = 10.0 needs num_classes"):
        FVVAE(6, 4, lambda_cls=10.0)


def test_sigma_x_is_bounded_below_by_the_data_scale():
    layer = small_layer(prenorm="descriptor", norm_scale=2.0)
    with torch.no_grad():
        layer.log_sigma_x.fill_(-30.0)
    layer.loss(torch.rand(4, 6, 3, 3), torch.tensor([0, 1, 2, 0]))
    rms = 2.0 / math.sqrt(6)  # every descriptor has norm 2 over 6 channels
    assert torch.allclose(layer.sigma_x(), torch.full((6,), 0.05 * rms), rtol=1e-5)


def test_fisher_buffer_streams_and_round_trips(tmp_path):
    layer = small_layer().eval()
    batches = [torch.rand(5, 6, 3, 3) for _ in range(3)]
    fisher = layer.fit_fisher(batches)
    raw = torch.cat([fv_vae_encode(b, _without_fisher(layer), normalize=False) for b in batches])
    assert relative_error(fisher.flatten(), raw.square().mean(0)) <= 1e-5
    assert int(layer.fisher_sets) == 15
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    restored = small_layer().eval()
    restored.load_state_dict(torch.load(path))
    assert torch.equal(restored.fisher, layer.fisher)
    images = torch.rand(2, 6, 3, 3)
    with torch.no_grad():
        assert torch.equal(restored(images), layer(images))
        scaled = fv_vae_encode(images, layer.to_params(), normalize=False)
        assert relative_error(scaled, fv_vae_encode(images, _without_fisher(layer), normalize=False)
                              / fisher.flatten().clamp_min(1e-12).sqrt()) <= 1e-5


def _without_fisher(layer):
    return dataclasses.replace(layer.to_params(), fisher=None)


def test_the_fisher_follows_the_buffers_wherever_they_come_from():
    """Whether the Fisher scales is read from fisher_sets in the graph, not from a flag on the module: a state
    swapped in by torch.func.functional_call, or a buffer reset by hand, are followed too."""
    fitted, fresh = small_layer().eval(), small_layer().eval()
    acts = torch.rand(4, 6, 3, 3)
    fitted.fit_fisher([acts])
    with torch.no_grad():
        expected = fitted(acts)
        assert torch.equal(torch.func.functional_call(fresh, dict(fitted.state_dict(), **dict(fitted.named_parameters())),
                                                      (acts,)), expected)
        fitted.fisher_sets.zero_()
        assert torch.equal(fitted(acts), fv_vae_encode(acts, _without_fisher(fitted)))


def test_sigma_floor_flag_follows_the_buffer(tmp_path):
    layer = small_layer().train()
    layer.loss(torch.rand(2, 5, 6), lengths=[0, 0])  # only empty sets: nothing to set the floor from
    assert not layer.has_sigma_floor and float(layer.sigma_x_min) == 0
    layer.loss(torch.rand(2, 5, 6))
    assert layer.has_sigma_floor and float(layer.sigma_x_min) > 0
    restored = small_layer()
    restored.load_state_dict(layer.state_dict())
    assert restored.has_sigma_floor
    state = layer.__getstate__()
    del state["has_sigma_floor"]  # as a layer pickled before the flag existed
    unpickled = FVVAE.__new__(FVVAE)
    unpickled.__setstate__(state)
    assert unpickled.has_sigma_floor


def test_fit_fisher_takes_a_tensor_as_one_batch():
    layer, acts = small_layer().eval(), torch.rand(5, 6, 3, 3)
    expected = layer.fit_fisher([acts]).clone()
    assert torch.equal(layer.fit_fisher(acts), expected) and int(layer.fisher_sets) == 5


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0.0, 1.0]), r"labels must be 2 integer class indices, one per set, got torch.float32"),
    (torch.tensor([0, 1, 2]), r"got torch.int64 of shape \(3,\)"),
    (torch.tensor([1, 3]), r"labels must lie in \[0, 2\] for this layer's num_classes=3, got values from 1 to 3"),
])
def test_loss_rejects_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        small_layer().loss(torch.rand(2, 6, 3, 3), labels)


def test_fit_fisher_skips_empty_sets():
    layer = small_layer(prenorm=None).eval()
    acts, lengths = torch.rand(4, 5, 6), torch.tensor([5, 0, 3, 0])
    layer.fit_fisher([(acts, lengths)])
    assert int(layer.fisher_sets) == 2
    with pytest.raises(ValueError, match="no non-empty set"):
        layer.fit_fisher([(acts[:1], torch.tensor([0]))])


@pytest.mark.parametrize("hidden", [(), (9,)])
def test_from_official_reproduces_the_weight_file(tmp_path, hidden):
    path = tmp_path / "weights.mat"
    write_official_mat(path, 12, hidden, 5, np.random.default_rng(1))
    layer = FVVAE.from_official(path).eval()
    params = load_official_weights(path)
    maps = torch.rand(3, 12, 7, 7)
    with torch.no_grad():
        assert relative_error(layer(maps), fv_vae_encode(maps, params)) <= 1e-5
    assert (layer.prenorm, layer.spp, layer.norm_scale) == ("map", "official", 158.0)


class TorchvisionStyle(nn.Module):
    """The shape of torchvision's ResNet: features, avgpool, flatten, fc."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(6, 4)

    def forward(self, images):
        return self.fc(torch.flatten(self.avgpool(self.features(images)), 1))


class TimmStyle(nn.Module):
    """The shape of timm's models and torchvision's EfficientNet: global_pool, a classifier Sequential."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(6, 4))

    def forward(self, images):
        return self.classifier(self.global_pool(self.stem(images)))


@pytest.mark.parametrize("make", [TorchvisionStyle, TimmStyle])
def test_the_layer_replaces_global_pooling(make):
    from fvkernels.nn import replace_global_pool

    torch.manual_seed(0)
    model, layer = make().eval(), small_layer().eval()
    images = torch.rand(5, 3, 4, 4)
    backbone = model.features if make is TorchvisionStyle else model.stem
    layer.fit_fisher([backbone(images).detach()])
    assert replace_global_pool(model, layer, num_classes=7) is model
    scores = model(images)
    assert scores.shape == (5, 7) and layer.output_dim == 6 * 5
    head = model.fc if make is TorchvisionStyle else model.classifier[1]
    with torch.no_grad():
        assert relative_error(scores, head(layer(backbone(images)))) <= 1e-6
    scores.sum().backward()  # end to end: the backbone learns through the Fisher vectors
    assert backbone[0].weight.grad.abs().sum() > 0 and layer.decoder.weight.grad.abs().sum() > 0


def test_replace_global_pool_refuses_what_is_not_a_global_pooling():
    from fvkernels.nn import replace_global_pool

    model = TorchvisionStyle()
    model.avgpool = nn.AdaptiveAvgPool2d((7, 7))  # a VGG-style head
    with pytest.raises(ValueError, match="cannot tell which submodule of TorchvisionStyle is its global pooling"):
        replace_global_pool(model, small_layer())
    model.avgpool, model.pool = nn.AdaptiveAvgPool2d(1), nn.MaxPool2d(2)  # a local pooling named pool stays
    replace_global_pool(model, small_layer())
    assert isinstance(model.avgpool, FVVAE) and isinstance(model.pool, nn.MaxPool2d)
    with pytest.raises(ValueError, match=r"'fc' of TorchvisionStyle takes 6 pooled channels but the layer encodes C = 5"):
        replace_global_pool(TorchvisionStyle(), FVVAE(5, 3))
    with pytest.raises(ValueError, match="has no classifier named 'head.fc'"):
        replace_global_pool(TorchvisionStyle(), small_layer(), classifier="head.fc")


def test_forward_and_loss_in_one_graph_on_the_first_training_step():
    """The first training loss sets the σx floor after forward may have saved σx: both in one backward (end-to-end
    fine-tuning) must work, with the gradient of forward as computed with the old floor."""
    torch.manual_seed(0)
    layer = FVVAE(24, 11, (40,), num_classes=3).train()
    acts = torch.rand(5, 24, 4, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1])
    torch.manual_seed(1)
    fv = layer(acts)
    losses = layer.loss(acts, labels)
    (fv.square().sum() + losses["total"]).backward()
    assert layer.has_sigma_floor and float(layer.sigma_x_min) > 0
    assert acts.grad is not None and torch.isfinite(acts.grad).all() and acts.grad.abs().sum() > 0
