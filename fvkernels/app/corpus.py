"""A corpus on disk — a list file of images and video frame folders — and the frozen CNN that turns it into
the local activations FV-VAE encodes. Shared by `fvkernels train` and `fvkernels extract`.

List file: one sample per line, `relative/path [label]` (0-based integer label), paths under a root
folder. A sample is an image file, or a folder of frames (a video: fvkernels.app.video's layout, frames in
name order, optionally `frames_per_video` of them evenly spaced). Unreadable inputs are reported with
their path and skipped — a video keeps its readable frames — or, with strict=True, stop the run.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fvkernels.app.backbones import Backbone
from fvkernels.app.listfile import list_file_lines
from fvkernels.app.video import load_images, sample_frames, video_frame_paths
from fvkernels.common.checks import nonfinite_rows
from fvkernels.common.files import sha256_text


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
    def valid(fields):
        return len(fields) == 1 or (len(fields) == 2 and fields[1].isdigit())

    lines = list_file_lines(path, "the sample list (--list)", "'relative/path [label ≥ 0]'", valid,
                            note=" (paths with spaces are not supported)")
    samples = [Sample(fields[0], int(fields[1]) if len(fields) == 2 else None) for _, fields in lines]
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
    return sha256_text("".join(f"{s.id}\t{s.label}\n" for s in samples))


def digest_corpus(samples: Sequence[Sample], frames_per_video: Optional[int]) -> str:
    """sha256 of what names a corpus's training sets: its samples and labels and the frames taken per video.
    Not the root folder, so that a job resumes after its data moved (staged to another node's disk)."""
    return sha256_text(f"{digest_samples(samples)}\n{frames_per_video}\n")


def check_root(root) -> None:
    """Refuses, before any work, a root under which every sample would be unreadable."""
    if not Path(root).is_dir():
        problem = "is not a folder" if Path(root).exists() else "does not exist"
        raise ValueError(f"root {str(root)!r} {problem}; --root must be the folder that the list's paths are "
                         "relative to")


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
        bad = nonfinite_rows(maps)
        if bad:
            owner, path, _ = pending[bad[0]]
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

