"""`fvkernels train`: the FV-VAE layer trained on a frozen backbone's activations of a corpus on disk, then its
Fisher fitted; `fvkernels finetune`: that layer fine-tuned end to end with the backbone's top blocks, then its
Fisher refitted. One process or every process of a torchrun job."""
from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fvkernels.app.backbones import Backbone, split_backbone
from fvkernels.app.corpus import (
    Sample,
    Unreadables,
    activation_batches,
    check_image_batch_memory,
    check_memory,
    check_root,
    digest_corpus,
)
from fvkernels.app.distributed import default_device
from fvkernels.app.video import check_frames_per_video
from fvkernels.common import collectives
from fvkernels.common.files import state_digest
from fvkernels.nn import FVVAE
from fvkernels.training.checkpoint import (
    check_counts,
    load_checkpoint,
    read_checkpoint,
    resume_state,
    write_checkpoint,
)
from fvkernels.training.data import SetData
from fvkernels.training.loop import check_fine_tuning, train


def train_on_corpus(samples: Sequence[Sample], root, backbone: Backbone, checkpoint, *,
                    layer_options: Optional[dict] = None, frames_per_video: Optional[int] = None, image_batch: int = 32,
                    strict: bool = False, distributed: bool = False, device=None, progress: bool = True,
                    **training) -> FVVAE:
    """`fvkernels train`: trains an FVVAE layer (options `layer_options`) on the backbone's activations of
    `samples` under `root` — each image, or each sampled frame of a video, one set with its sample's
    label — then fits its Fisher on the same sets. The checkpoint holds both and the backbone's spec.
    `training` goes to `train` (iterations, batch_size, lr, seed, checkpoint_every).

    distributed: each process computes the activations of a contiguous share of the samples; the shares
    are gathered (every global batch draws from all sets), and each process fits the Fisher on its own.
    The result does not depend on the number of processes, up to rounding.

    Refused before any activation is computed: a root holding none of the samples, an image batch or a layer
    that would not fit in the memory available, and a checkpoint of another run (options, batch size, data).
    """
    options = _run_options(training, checkpoint, frames_per_video, image_batch)
    processes = collectives.rank_and_size(distributed)[1]
    device = torch.device(device) if device is not None else default_device(distributed)
    _check_inputs(samples, root, backbone, image_batch, device, distributed)
    backbone.to(device)
    with torch.no_grad():  # the maps' shape, known before any image is read, sizes the layer
        no_maps = backbone.features(torch.zeros(1, 3, backbone.image_size, backbone.image_size, device=device))[:0]
    labelled = samples[0].label is not None
    layer_options = dict(layer_options or {})
    if labelled and layer_options.get("lambda_cls", None) != 0:
        layer_options["num_classes"] = max(sample.label for sample in samples) + 1
    collectives.on_main(lambda: _check_training_memory(no_maps.shape[1], no_maps.shape[2] * no_maps.shape[3],
                                                       layer_options, math.ceil(options["batch_size"] / processes),
                                                       device), distributed)
    with torch.random.fork_rng(devices=[]):  # the same initial layer in every process and every run
        torch.manual_seed(options["seed"])
        model = FVVAE(no_maps.shape[1], **layer_options)
    data_fingerprint = digest_corpus(samples, frames_per_video)

    def check_checkpoint():
        state = resume_state(checkpoint, model, backbone.spec, dict(seed=options["seed"], lr=options["lr"],
                                                                    data_fingerprint=data_fingerprint),
                             options["iterations"])
        _check_resumed_batch_size(state, checkpoint, options["batch_size"])

    collectives.on_main(check_checkpoint, distributed)

    data, local_acts = _corpus_sets(samples, root, backbone, no_maps, frames_per_video=frames_per_video,
                                    image_batch=image_batch, strict=strict, distributed=distributed, device=device,
                                    progress=progress)
    train(model, data, checkpoint=checkpoint, distributed=distributed, input_spec=backbone.spec, device=device,
          progress=progress, data_fingerprint=data_fingerprint, **training)
    model.fit_fisher(local_acts.split(256), distributed=distributed)
    # a failure reaches every process, none waits for process 0
    collectives.on_main(lambda: _store_fisher(checkpoint, model), distributed)
    return model


def finetune_on_corpus(samples: Sequence[Sample], root, init, checkpoint, *, trainable_blocks: int = 2,
                       trunk_lr: Optional[float] = None, trunk_losses: str = "discriminative", lambda_fv: float = 1.0,
                       frames_per_video: Optional[int] = None,
                       image_batch: int = 32, strict: bool = False, distributed: bool = False, device=None,
                       progress: bool = True, **training) -> Tuple[FVVAE, Backbone]:
    """`fvkernels finetune`: end-to-end fine-tuning (the paper's "w ft") of the layer of a `fvkernels train`
    checkpoint `init` together with the backbone's last `trainable_blocks` blocks up to its tap, on `samples` under
    `root`, then the Fisher refitted on the fine-tuned maps. The backbone's frozen bottom runs once over the corpus;
    each step runs the top and the layer on a batch of its maps and backpropagates Algorithm 1's losses (with
    lambda_fv > 0 and labels, also a linear classifier's cross-entropy on the normalised Fisher vectors) into the
    layer, and those trunk_losses names into the top.
    The checkpoint holds the layer, the top's weights ("trunk") and the spec that `fvkernels extract` rebuilds the
    fine-tuned backbone from; rerunning resumes. `training` goes to `train` (iterations, batch_size, lr, seed,
    checkpoint_every); trunk_lr: the top's AdaDelta rate (default lr); trunk_losses: which losses reach the top
    ("discriminative" or "all", see `train`). Returns the layer and the fine-tuned backbone.
    """
    options = _run_options(training, checkpoint, frames_per_video, image_batch)
    if Path(init).resolve() == Path(checkpoint).resolve():
        raise ValueError(f"the fine-tuned checkpoint {str(checkpoint)!r} would overwrite the one it starts from; "
                         "choose another path")
    start = read_checkpoint(init)
    spec = start["input_spec"]
    if not spec or "trainable_blocks" in spec:
        raise ValueError(f"{str(init)!r} is not a `fvkernels train` checkpoint of a frozen backbone (its input_spec "
                         f"is {spec!r}); fine-tune the layer `fvkernels train` wrote")
    model = load_checkpoint(init)
    if not model.has_fisher:
        raise ValueError(f"{str(init)!r} has no fitted Fisher; let `fvkernels train` finish (rerun it to resume), then "
                         "fine-tune")
    whole, bottom, top = split_backbone(spec, trainable_blocks)
    # The init's weights are part of what the run depends on: resuming from another init is refused like other data.
    input_spec = dict(spec, trainable_blocks=int(trainable_blocks), init_sha256=state_digest(model))
    labels = torch.tensor([sample.label for sample in samples]) if samples and samples[0].label is not None else None
    fv_classifier = None
    if lambda_fv and labels is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options["seed"])
            fv_classifier = nn.Linear(model.output_dim, int(labels.max()) + 1)
    if model.classifier is not None and labels is not None:
        model._check_labels(labels, len(labels))
    check_fine_tuning(model, top, trunk_lr, trunk_losses, fv_classifier, lambda_fv, labels)
    device = torch.device(device) if device is not None else default_device(distributed)
    _check_inputs(samples, root, whole, image_batch, device, distributed)
    data_fingerprint = digest_corpus(samples, frames_per_video)
    modules = {"trunk": top} | ({"fv_classifier": fv_classifier} if fv_classifier is not None else {})
    fine_tuning = dict(trunk_lr=options["lr"] if trunk_lr is None else trunk_lr,
                       lambda_fv=lambda_fv if fv_classifier is not None else None, trunk_losses=trunk_losses)

    def check_checkpoint():
        state = resume_state(checkpoint, model, input_spec, dict(seed=options["seed"], lr=options["lr"],
                                                                 data_fingerprint=data_fingerprint, **fine_tuning),
                             options["iterations"], modules)
        _check_resumed_batch_size(state, checkpoint, options["batch_size"])
        if state is not None and state.get("fisher_refitted_at") is not None and \
                options["iterations"] > state["iteration"]:
            raise ValueError(f"checkpoint {str(checkpoint)!r} finished its {state['iteration']} steps and holds the "
                             "Fisher refitted after them, not the one its training used; fine-tune for more steps into "
                             "a new checkpoint path")

    collectives.on_main(check_checkpoint, distributed)
    bottom.to(device)
    with torch.no_grad():
        no_maps = bottom.features(torch.zeros(1, 3, bottom.image_size, bottom.image_size, device=device))[:0]
    data, local_inputs = _corpus_sets(samples, root, bottom, no_maps, frames_per_video=frames_per_video,
                                      image_batch=image_batch, strict=strict, distributed=distributed, device=device,
                                      progress=progress)
    train(model, data, checkpoint=checkpoint, distributed=distributed, input_spec=input_spec, device=device,
          progress=progress, data_fingerprint=data_fingerprint, trunk=top, trunk_lr=trunk_lr,
          trunk_losses=trunk_losses, fv_classifier=fv_classifier, lambda_fv=lambda_fv, **training)
    with torch.no_grad():  # the maps changed with the top: the Fisher of the frozen run no longer fits them
        model.fit_fisher((top(chunk) for chunk in local_inputs.split(256)), distributed=distributed)
    collectives.on_main(lambda: _store_fisher(checkpoint, model, refitted=True), distributed)
    whole.spec = dict(input_spec, trunk_sha256=state_digest(top))
    return model, whole


def _run_options(training: dict, checkpoint, frames_per_video: Optional[int], image_batch: int) -> dict:
    """train's options with its defaults filled in, checked with the corpus options before the long part."""
    options = {name: parameter.default for name, parameter in inspect.signature(train).parameters.items()
               if parameter.kind is parameter.KEYWORD_ONLY} | training
    check_counts(options["iterations"], options["batch_size"], options["checkpoint_every"], checkpoint)
    check_frames_per_video(frames_per_video)
    if image_batch < 1:
        raise ValueError(f"image_batch must be positive, got {image_batch}")
    return options


def _check_inputs(samples: Sequence[Sample], root, backbone: Backbone, image_batch: int, device,
                  distributed: bool) -> None:
    """Before the backbone's first image: the root holds the samples and a batch of images fits in memory."""
    def check():
        check_root(root, samples)
        check_image_batch_memory(backbone, image_batch, device)

    collectives.on_main(check, distributed)


def _corpus_sets(samples: Sequence[Sample], root, backbone: Backbone, no_maps: Tensor, *,
                 frames_per_video: Optional[int], image_batch: int, strict: bool, distributed: bool, device,
                 progress: bool) -> Tuple[SetData, Tensor]:
    """The backbone's maps of the corpus as training sets (each image, or each sampled frame of a video, one set with
    its sample's label), gathered from every process, and this process's share of them. no_maps: the maps' shape."""
    rank, processes = collectives.rank_and_size(distributed)
    labelled = bool(samples) and samples[0].label is not None
    share = samples[rank * len(samples) // processes: (rank + 1) * len(samples) // processes]
    owners, maps = [torch.zeros(0, dtype=torch.int64)], [no_maps]  # no_maps: a share without readable images
    unreadables = Unreadables(strict)
    for batch_owners, batch_maps in activation_batches(share, root, backbone, frames_per_video=frames_per_video,
                                                       batch_size=image_batch, unreadables=unreadables, device=device,
                                                       progress=progress and rank == 0):
        owners.append(batch_owners)
        maps.append(batch_maps)
    if unreadables.records:
        print(f"fvkernels: {len(unreadables.records)} unreadable inputs skipped"
              f"{f' by process {rank} of {processes}' if distributed else ''}", file=sys.stderr)
    local_acts = torch.cat(maps)
    local_labels = torch.tensor([share[owner].label for owner in torch.cat(owners).tolist()], dtype=torch.int64,
                                device=device) if labelled else None
    data = SetData(collectives.gather_rows(local_acts, distributed),
                   collectives.gather_rows(local_labels, distributed) if labelled else None)
    if len(data) == 0:
        raise ValueError(f"none of the {len(samples)} samples had a readable image; check the list and --root")
    return data, local_acts


def _store_fisher(checkpoint, model: FVVAE, refitted: bool = False) -> None:
    """The fitted Fisher into the finished run's checkpoint; refitted (fine-tuning): marked with the step it was
    refitted after, which `fvkernels extract` requires (before it, the layer holds the init's Fisher, fitted on other
    maps)."""
    state = read_checkpoint(checkpoint)
    state["model"] = model.state_dict()
    if refitted:
        state["fisher_refitted_at"] = state["iteration"]
    write_checkpoint(checkpoint, state)  # with its new digest, and never with non-finite weights


def _check_resumed_batch_size(state: Optional[dict], checkpoint, batch_size: int) -> None:
    """Refuses to resume with another batch size, before the activations: the checkpoint stores the batch the
    run took, min(batch size, number of sets), and the number of sets, which the data fingerprint fixes."""
    stored = (state or {}).get("training") or {}
    if "batch_size" in stored and "num_sets" in stored and min(batch_size, stored["num_sets"]) != stored["batch_size"]:
        raise ValueError(f"checkpoint {str(checkpoint)!r} was trained with other options — batch_size: checkpoint "
                         f"{stored['batch_size']}, now {min(batch_size, stored['num_sets'])} (of its "
                         f"{stored['num_sets']} sets); resume with the same options, or train into a new checkpoint "
                         "path")


def _check_training_memory(channels: int, descriptors_per_set: int, layer_options: dict, sets_per_process: int,
                           device) -> None:
    """Refuses, before it is built, a layer whose training would not fit in memory: its parameters with their
    gradients and AdaDelta's two running averages, a batch's activations through every layer (kept for the
    backward, about three copies) and a chunk of 256 Fisher vectors."""
    defaults = {name: parameter.default for name, parameter in inspect.signature(FVVAE).parameters.items()}
    latent = layer_options.get("latent_dim", defaults["latent_dim"])
    hidden = list(layer_options.get("hidden", defaults["hidden"]))
    classes = layer_options.get("num_classes") or 0
    widths = [channels, *hidden, latent]
    parameters = sum((a + 1) * b for a, b in zip(widths, widths[1:])) + (latent + 1) * (channels + classes)
    activations = sets_per_process * descriptors_per_set * (sum(widths) + channels + classes)
    what = f"training an FV-VAE layer {' → '.join(map(str, widths))}" + (
        f" with {classes} classes (the largest label + 1)" if classes else "") + f" on {sets_per_process} sets a step"
    check_memory(4 * (4 * parameters + 3 * activations + 256 * channels * (latent + 1)), device, what,
                 "choose a smaller --latent-dim, --hidden or --batch-size, or number the labels from 0 without gaps")
