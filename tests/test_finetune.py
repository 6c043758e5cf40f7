"""End-to-end fine-tuning (the paper's "w ft"): `train` with a trainable trunk and a classifier on the Fisher
vectors — they learn, resume exactly, and refuse what they cannot use —, EfficientNet-Lite0's split into a frozen
bottom and a trainable top, and the translated task's canvas."""
import pytest
import torch
from torch import nn

from fvkernels.app.datasets import place_on_canvas
from fvkernels.app.efficientnet import EfficientNetLite0
from fvkernels.nn import FVVAE
from fvkernels.training import SetData, read_checkpoint, train


def trunk_and_data(seed=0):
    """A conv trunk (the second conv frozen) over 3×5×5 inputs, and 24 labelled sets whose class sets a channel."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.ReLU())
    trunk[2].requires_grad_(False)
    labels = torch.arange(24) % 3
    inputs = torch.rand(24, 3, 5, 5)
    inputs[torch.arange(24), labels] += 2.0
    layer = FVVAE(6, 3, (8,), num_classes=3, lambda_cls=10.0)
    return trunk, layer, nn.Linear(layer.output_dim, 3), SetData(inputs, labels)


def fine_tune(path=None, iterations=4, **options):
    trunk, layer, head, data = trunk_and_data()
    history = train(layer, data, iterations=iterations, batch_size=8, trunk=trunk, trunk_lr=0.5, fv_classifier=head,
                    lambda_fv=2.0, checkpoint=path, checkpoint_every=2, progress=False, **options)
    return trunk, layer, head, history


def states(*modules):
    return [{name: tensor.clone() for name, tensor in module.state_dict().items()} for module in modules]


def test_fine_tuning_trains_the_trunk_and_the_classifier_on_the_fisher_vectors():
    initial_trunk, initial_layer, initial_head, _ = trunk_and_data()
    trunk, layer, head, history = fine_tune()
    assert set(history[0]) == {"rec", "reg", "cls", "fv_cls", "total"}
    for step in history:  # total = λ_rec·rec + λ_reg·reg + λ3·cls + λ_fv·fv_cls
        assert step["total"] == pytest.approx(step["rec"] + step["reg"] + 10 * step["cls"] + 2 * step["fv_cls"],
                                              rel=1e-5)
    assert not torch.equal(trunk[0].weight, initial_trunk[0].weight)  # trained, at trunk_lr
    assert torch.equal(trunk[2].weight, initial_trunk[2].weight)  # requires_grad=False: untouched
    assert not torch.equal(head.weight, initial_head.weight)
    assert trunk.training and not layer.training and not head.training  # the trunk's mode as the caller had it
    mixed = trunk_and_data()[0]
    mixed[0].eval()  # e.g. frozen batch norms inside a module in training mode: each module keeps its own mode
    train(trunk_and_data()[1], trunk_and_data()[3], iterations=1, batch_size=8, trunk=mixed, progress=False)
    assert [module.training for module in mixed.modules()] == [True, False, True, True, True]


def test_only_the_classification_losses_reach_the_trunk_unless_every_loss_is_asked_for():
    """trunk_losses="discriminative": the trunk's gradient is that of λ3·cls + λ_fv·fv_cls alone, the layer's that
    of the whole total; "all": the trunk's is that of the total."""
    from fvkernels.training.loop import _Objective

    def gradients(trunk_losses, terms):
        trunk, layer, head, data = trunk_and_data()
        layer.train()
        layer.init_sigma_floor(trunk(data.acts[:8]).detach())
        objective = _Objective(layer, trunk, head, 2.0, trunk_losses)
        losses = objective(data.acts[:8], data.labels[:8], None, list(range(8)))
        sum(weight * losses[name] for name, weight in terms).backward()
        return trunk[0].weight.grad.clone(), layer.decoder.weight.grad.clone(), losses

    total = [("total", 1.0)]
    discriminative, decoder, losses = gradients("discriminative", total)
    assert torch.allclose(discriminative, gradients("all", [("cls", 10.0), ("fv_cls", 2.0)])[0], atol=1e-6)
    assert torch.allclose(decoder, gradients("all", total)[1], atol=1e-5)  # the layer learns from every term
    every = gradients("all", total)[0]
    assert not torch.allclose(every, discriminative, atol=1e-3)
    assert losses["total"].item() == pytest.approx(losses["rec"].item() + losses["reg"].item()
                                                   + 10 * losses["cls"].item() + 2 * losses["fv_cls"].item(), rel=1e-6)


def test_fine_tuning_resumes_to_the_same_weights(tmp_path):
    straight = states(*fine_tune(tmp_path / "straight.pt")[:3])
    fine_tune(tmp_path / "resumed.pt", iterations=2)
    resumed = states(*fine_tune(tmp_path / "resumed.pt")[:3])
    for mine, theirs in zip(resumed, straight):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    stored = read_checkpoint(tmp_path / "resumed.pt")
    assert set(stored["modules"]) == {"trunk", "fv_classifier"}
    assert stored["training"]["trunk_lr"] == 0.5 and stored["training"]["lambda_fv"] == 2.0


def test_fine_tuning_refuses_what_it_cannot_use(tmp_path):
    trunk, layer, head, data = trunk_and_data()
    with pytest.raises(ValueError, match="fv_classifier needs labels"):
        train(layer, SetData(data.acts), iterations=1, trunk=trunk, fv_classifier=head, progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\] for fv_classifier's 2 outputs, got values from "
                                         r"0 to 2"):
        train(layer, data, iterations=1, trunk=trunk, fv_classifier=nn.Linear(layer.output_dim, 2), progress=False)
    with pytest.raises(ValueError, match="lambda_fv must be a finite number ≥ 0"):
        train(layer, data, iterations=1, trunk=trunk, fv_classifier=head, lambda_fv=-1.0, progress=False)
    with pytest.raises(TypeError, match="trunk must be an nn.Module"):
        train(layer, data, iterations=1, trunk=lambda x: x, progress=False)
    with pytest.raises(ValueError, match="trunk_losses must be one of 'discriminative', 'all', got 'generative'"):
        train(layer, data, iterations=1, trunk=trunk, trunk_losses="generative", progress=False)
    with pytest.raises(ValueError, match="trunk_losses='discriminative' trains the trunk by the classification "
                                         "losses, and this run has none"):
        train(FVVAE(6, 3, (8,)), SetData(data.acts), iterations=1, trunk=trunk, progress=False)
    with pytest.raises(ValueError, match="and this run has none"):  # a classifier with weight 0 trains nothing
        train(FVVAE(6, 3, (8,)), data, iterations=1, trunk=trunk, fv_classifier=head, lambda_fv=0.0, progress=False)
    # a frozen run's checkpoint is not a fine-tuning run's, and the reverse
    frozen = tmp_path / "frozen.pt"
    with torch.no_grad():
        maps = trunk(data.acts)
    train(trunk_and_data()[1], SetData(maps, data.labels), iterations=1, batch_size=8, checkpoint=frozen,
          progress=False)
    fine_tune(tmp_path / "tuned.pt", iterations=2)
    with pytest.raises(ValueError, match=r"trained with the modules none beside the layer, this run with "
                                         r"\['fv_classifier', 'trunk'\]"):
        fine_tune(frozen)
    wider = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 6, 1), nn.ReLU())
    with pytest.raises(ValueError, match=r"holds a trunk of another shape \(differs in \['0.bias', '0.weight', "
                                         r"'2.weight'\]\)"):
        train(trunk_and_data()[1], data, iterations=4, batch_size=8, trunk=wider, trunk_lr=0.5, fv_classifier=head,
              lambda_fv=2.0, checkpoint=tmp_path / "tuned.pt", checkpoint_every=2, progress=False)
    with pytest.raises(ValueError, match="trunk_lr: checkpoint 0.5, now 0.25"):
        train(trunk_and_data()[1], data, iterations=4, batch_size=8, trunk=trunk_and_data()[0], trunk_lr=0.25,
              fv_classifier=head, lambda_fv=2.0, checkpoint=tmp_path / "tuned.pt", checkpoint_every=2, progress=False)


def test_forward_and_loss_in_one_graph_through_a_trunk_train_from_the_first_step():
    """The fine-tuning objective differentiates the loss and the Fisher vectors of one forward of the trunk; the σx
    floor set on the first batch must not invalidate what the forward saved."""
    trunk, layer, head, data = trunk_and_data()
    layer.train()
    acts = trunk(data.acts[:8])
    losses = layer.loss(acts, data.labels[:8])
    (losses["total"] + nn.functional.cross_entropy(head(layer(acts)), data.labels[:8])).backward()
    assert trunk[0].weight.grad is not None and torch.isfinite(trunk[0].weight.grad).all()


@pytest.mark.parametrize("layer,blocks,bottom", [("block5.depthwise", 2, "block3"), ("block5.depthwise", 1, "block4"),
                                                 ("block4", 5, "stem"), ("block1.expanded", 1, "block0"),
                                                 ("head", 2, "block14")])
def test_efficientnet_split_gives_the_tap_from_the_bottom_and_shares_the_weights(layer, blocks, bottom):
    network = EfficientNetLite0().eval()
    images = torch.randn(2, 3, 48, 48)
    bottom_layer, top = network.split(layer, blocks)
    assert bottom_layer == bottom and not top.training  # the network's mode
    with torch.no_grad():
        maps = top(network.features(images, bottom_layer)[bottom_layer])
        assert torch.equal(maps, network.features(images, layer)[layer])
        next(top.parameters()).add_(1.0)  # the top's weights are the network's
        assert torch.equal(top(network.features(images, bottom_layer)[bottom_layer]),
                           network.features(images, layer)[layer])
    trainable = {name for name, parameter in top.named_parameters() if parameter.requires_grad}
    if layer.endswith(".depthwise"):  # the tap's block after the tap takes no part: frozen
        assert not any(name.startswith(f"blocks.{len(top.blocks) - 1}.project") for name in trainable)


def test_a_split_at_another_tap_trains_what_an_earlier_split_froze():
    network = EfficientNetLite0()
    network.split("block5.depthwise", 1)  # freezes block5's projection, which takes no part there
    _, top = network.split("block5", 1)
    assert all(parameter.requires_grad for parameter in top.parameters())


@pytest.mark.parametrize("layer,blocks,message", [
    ("block5.depthwise", 7, r"trainable_blocks must lie in 1…6 for layer 'block5.depthwise'"),
    ("block5.depthwise", 0, r"trainable_blocks must lie in 1…6"),
    ("head", 18, r"trainable_blocks must lie in 1…17 for layer 'head' \(the blocks up to it, the head counted as "
                 r"one\)"),
    ("stem", 1, "the stem is the network's first layer"),
    ("block99", 1, "unknown feature layer 'block99'"),
])
def test_efficientnet_split_refuses_what_does_not_exist(layer, blocks, message):
    with pytest.raises(ValueError, match=message):
        EfficientNetLite0().split(layer, blocks)


def test_place_on_canvas_moves_every_item_and_keeps_it_whole():
    images = torch.randint(1, 256, (64, 28, 28), dtype=torch.uint8)
    placed = place_on_canvas(images, 56, torch.Generator().manual_seed(0))
    assert placed.shape == (64, 56, 56) and placed.dtype == torch.uint8
    corners = set()
    for image, canvas in zip(images, placed):
        rows, cols = canvas.nonzero(as_tuple=True)  # every pixel of the item is non-zero: its box is where it went
        top, left = int(rows.min()), int(cols.min())
        assert torch.equal(canvas[top: top + 28, left: left + 28], image) and int((canvas > 0).sum()) == 28 * 28
        corners.add((top, left))
    assert len(corners) > 50  # positions drawn over the whole canvas, not a few
    assert torch.equal(placed, place_on_canvas(images, 56, torch.Generator().manual_seed(0)))  # the seed decides
    scaled = place_on_canvas(images, 56, torch.Generator().manual_seed(1), scale_jitter=1.5)
    sizes = [int((canvas > 0).any(1).sum()) for canvas in scaled]
    assert min(sizes) >= 28 / 1.5 - 1 and max(sizes) <= 28 * 1.5 + 1 and len(set(sizes)) > 5
    with pytest.raises(ValueError, match="a 40×40 canvas cannot hold items of 28×28 scaled up to ×1.5; use a canvas "
                                         "of at least 42 pixels"):
        place_on_canvas(images, 40, torch.Generator(), scale_jitter=1.5)
    with pytest.raises(ValueError, match="scale_jitter must be ≥ 1"):
        place_on_canvas(images, 56, torch.Generator(), scale_jitter=0.5)


def test_a_checkpoint_never_holds_nonfinite_trunk_weights(tmp_path):
    from fvkernels.common.checks import NonFiniteError
    from fvkernels.training import save_checkpoint

    trunk, layer, head, _ = trunk_and_data()
    with torch.no_grad():
        trunk[0].weight[1, 2, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"trunk\.0\.weight holds NaN at index \(1, 2, 0, 0\)"):
        save_checkpoint(tmp_path / "tuned.pt", layer, modules={"trunk": trunk, "fv_classifier": head})
    assert not (tmp_path / "tuned.pt").exists()
