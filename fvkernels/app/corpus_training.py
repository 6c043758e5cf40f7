"""`fvkernels train`: the FV-VAE layer trained on a frozen backbone's activations of a corpus on disk, then its
Fisher fitted; one process or every process of a torchrun job."""
from __future__ import annotations

import inspect
import math
import sys
from typing import Optional, Sequence

import torch

from fvkernels.app.backbones import Backbone
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
from fvkernels.nn import FVVAE
from fvkernels.training.checkpoint import check_counts, read_checkpoint, resume_state, write_checkpoint
from fvkernels.training.data import SetData
from fvkernels.training.loop import train


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
    # train's options with its defaults filled in: some are checked before the long part, the activations
    options = {name: parameter.default for name, parameter in inspect.signature(train).parameters.items()
               if parameter.kind is parameter.KEYWORD_ONLY} | training
    check_counts(options["iterations"], options["batch_size"], options["checkpoint_every"], checkpoint)
    check_frames_per_video(frames_per_video)
    if image_batch < 1:
        raise ValueError(f"image_batch must be positive, got {image_batch}")
    rank, processes = collectives.rank_and_size(distributed)
    device = torch.device(device) if device is not None else default_device(distributed)

    def check_root_and_image_memory():  # before the backbone's first image, the probe of its maps' shape
        check_root(root, samples)
        check_image_batch_memory(backbone, image_batch, device)

    collectives.on_main(check_root_and_image_memory, distributed)
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

    train(model, data, checkpoint=checkpoint, distributed=distributed, input_spec=backbone.spec, device=device,
          progress=progress, data_fingerprint=data_fingerprint, **training)
    model.fit_fisher(local_acts.split(256), distributed=distributed)

    def store_fisher():
        state = read_checkpoint(checkpoint)
        state["model"] = model.state_dict()
        write_checkpoint(checkpoint, state)  # with its new digest, and never with non-finite weights

    collectives.on_main(store_fisher, distributed)  # a failure reaches every process, none waits for process 0
    return model


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
