"""A corpus on disk — a list file of images and video frame folders — and the frozen CNN that turns it into
the local activations FV-VAE encodes. Shared by `fvkernels train` and `fvkernels extract`.

List file (--list): UTF-8 text, one sample per line, blank lines ignored:

    relative/path                 a sample without a label
    relative/path<TAB>label       a sample with its label: a whole number 0 … 2³¹−1 in ASCII digits (0-based)
    relative/path<TAB>            a sample without a label whose path holds spaces

The path is everything before the tab, spaces around it removed, so it may contain spaces. A line without a
tab may also be `path label` (one run of spaces, as lists written before tabs were needed) — only when the path
has no whitespace: a line without a tab that holds whitespace and is not exactly `path label` is refused, never
split into a path and a label by guesswork. Either every line has a label or none has; each path appears once,
relative to the root folder (an absolute path, which would ignore the root, is refused) and holds no control
characters. Errors name the file and the line.

A sample is an image file, or a folder of frames (a video: fvkernels.app.video's layout, frames in name order,
optionally `frames_per_video` of them evenly spaced). Only regular files are read: a FIFO, device or socket is
never opened. Unreadable inputs are reported with their path and skipped — a video keeps its readable frames —
(the first few one by one, the rest counted) or, with strict=True, stop the run. A root under which none of the
samples exist is refused before any work, and so is a batch of images larger than the memory available.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fvkernels.app.backbones import Backbone
from fvkernels.app.listfile import is_ascii_number, list_file_lines
from fvkernels.app.video import load_images, sample_frames, video_frame_paths
from fvkernels.common.checks import nonfinite_rows
from fvkernels.common.files import sha256_text

LIST_FORM = "'relative/path' or 'relative/path<TAB>label' (label: a whole number ≥ 0)"
MAX_LABEL = 2 ** 31 - 1
# Samples spread over the list whose presence under the root is checked before any work: a wrong --root then
# fails at once, not after a line per sample; a right one has some of them even when a few are missing.
ROOT_PROBES = 32
# Unreadable inputs printed one by one; the rest are counted (one line per input of a missing folder of a
# thousand videos would bury the rest of the output).
SHOWN_UNREADABLE = 10
# float32 values held per input pixel while the backbone runs on a batch: the image, its normalised copy and the
# widest early maps (measured: 89 for EfficientNet-Lite0 up to block5.depthwise, under no_grad), rounded up.
BACKBONE_FLOATS_PER_PIXEL = 96


@dataclass(frozen=True)
class Sample:
    id: str  # the path relative to the root, as in the list file
    label: Optional[int] = None


@dataclass(frozen=True)
class Unreadable:
    sample: str
    path: str
    reason: str


def parse_sample_line(line: str) -> Sample:
    """One line of a list file as the module docstring defines it; a ValueError says what is wrong with it."""
    if "\t" in line:
        path, _, label = (part.strip() for part in line.partition("\t"))
        if "\t" in label:
            raise ValueError("more than one tab; a tab separates the path from the label")
    else:
        fields = line.split()
        if len(fields) > 2 or (len(fields) == 2 and not is_ascii_number(fields[1])):
            raise ValueError("whitespace without a tab: this is not 'path label' (a label is a whole number in ASCII "
                             "digits 0-9), and a path with whitespace must end at a tab: 'path<TAB>label', or "
                             "'path<TAB>' without a label")
        path, label = fields[0], fields[1] if len(fields) == 2 else ""
    if not path:
        raise ValueError("no path before the tab")
    if any(ord(character) < 32 or character == "\x7f" for character in path):
        raise ValueError(f"the path {path!r} holds a control character")
    if Path(path).is_absolute():
        raise ValueError(f"the path {path!r} is absolute, which would ignore --root; list paths relative to it")
    if label and not (is_ascii_number(label) and int(label) <= MAX_LABEL):
        raise ValueError(f"the label {label!r} is not a whole number from 0 to {MAX_LABEL} in ASCII digits (0-9)")
    return Sample(path, int(label) if label else None)


def read_sample_list(path) -> List[Sample]:
    """The samples of a list file (format: the module docstring), sorted by id (so the order does not depend on
    the file's order). Either every line has a label or none has."""
    lines = list(list_file_lines(path, "the sample list (--list)", LIST_FORM, parse_sample_line))
    if not lines:
        raise ValueError(f"{path} lists no samples")
    unlabelled = [number for number, sample in lines if sample.label is None]
    if 0 < len(unlabelled) < len(lines):
        raise ValueError(f"{path}: {len(lines) - len(unlabelled)} of {len(lines)} lines have a label (lines without: "
                         f"{', '.join(map(str, unlabelled[:5]))}{', …' if len(unlabelled) > 5 else ''}); label every "
                         "line or none")
    samples = sorted((sample for _, sample in lines), key=lambda sample: sample.id)
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


def check_root(root, samples: Sequence[Sample]) -> None:
    """Refuses, before any work, a root under which every sample would be unreadable: one that is not a folder,
    or one under which none of ROOT_PROBES samples spread over the list exists (a wrong --root, or the list of
    another corpus). Samples missing among present ones are left to activation_batches, which reports them."""
    if not Path(root).is_dir():
        problem = "is not a folder" if Path(root).exists() else "does not exist"
        raise ValueError(f"root {str(root)!r} {problem}; --root must be the folder that the list's paths are "
                         "relative to")
    count = min(ROOT_PROBES, len(samples))
    probes = [samples[index * (len(samples) - 1) // max(count - 1, 1)] for index in range(count)]  # first to last
    if probes and not any((Path(root) / sample.id).exists() for sample in probes):
        which = f"the {len(samples)} listed samples" if len(probes) == len(samples) else \
            f"{len(probes)} samples spread over the {len(samples)} listed"
        raise ValueError(f"none of {which} exists under root {str(root)!r} (the first would be "
                         f"{str(Path(root) / probes[0].id)!r}); --root must be the folder that the list's paths are "
                         "relative to")


# ---- memory ----------------------------------------------------------------------------------------------

def available_memory(device) -> int:
    """Bytes that can be allocated now: the GPU's free memory, or the host's available memory (free plus
    reclaimable), within this cgroup's limit when it has one."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass  # not Linux, or an old kernel: the free pages are a lower bound
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit
    return available


def check_memory(needed: int, device, what: str, remedy: str) -> None:
    """Refuses, before it is allocated, `what` needing `needed` bytes when less is available on `device`."""
    available = available_memory(device)
    if needed > available:
        raise ValueError(f"{what} needs about {_size(needed)} of memory, but {_size(available)} is available "
                         f"{'on ' + str(device) if torch.device(device).type != 'cpu' else 'on this machine'}; "
                         f"{remedy}")


def _size(count: int) -> str:
    unit, name = next(((unit, name) for unit, name in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB"))
                       if count >= unit), (1, "bytes"))
    return f"{count / unit:.1f} {name}" if unit > 1 else f"{count} bytes"


def check_image_batch_memory(backbone: Backbone, batch_size: int, device) -> None:
    """Refuses an image size and batch whose backbone pass would not fit in the memory available."""
    size = backbone.image_size
    check_memory(batch_size * size * size * 4 * BACKBONE_FLOATS_PER_PIXEL, device,
                 f"the backbone's pass over a batch of {batch_size} images (--image-batch) of {size}×{size} pixels "
                 f"(--image-size {size})", "choose a smaller --image-size (at `fvkernels train`) or --image-batch")


# ---- activations -----------------------------------------------------------------------------------------

def image_paths(root, sample: Sample, frames_per_video: Optional[int]) -> List[Path]:
    """The image of an image sample, or the (sampled) frames of a video sample."""
    path = Path(root) / sample.id
    if path.is_dir():
        return sample_frames(video_frame_paths(root, sample.id), frames_per_video)
    if not path.exists():
        raise FileNotFoundError(f"no image file or frame folder {str(path)!r}")
    return [path]


@dataclass
class Unreadables:
    """The unreadable inputs of a run. strict: the first one raises. Otherwise each is recorded in `records` and
    the first SHOWN_UNREADABLE are printed as they come, then one line saying that the rest are only counted."""
    strict: bool = False
    records: List[Unreadable] = field(default_factory=list)

    def add(self, record: Unreadable) -> None:
        if self.strict:
            raise ValueError(f"unreadable input {record.path!r} of sample {record.sample!r}: {record.reason} (strict "
                             "mode; without --strict such inputs are skipped and listed)")
        self.records.append(record)
        if len(self.records) <= SHOWN_UNREADABLE:
            tqdm.write(f"fvkernels: skipping unreadable {record.path!r} (sample {record.sample!r}): {record.reason}",
                       file=sys.stderr)
        elif len(self.records) == SHOWN_UNREADABLE + 1:
            tqdm.write("fvkernels: more unreadable inputs: skipped and counted, without a line each", file=sys.stderr)


def activation_batches(samples: Sequence[Sample], root, backbone: Backbone, *,
                       frames_per_video: Optional[int] = None, batch_size: int = 32,
                       unreadables: Optional[Unreadables] = None, device="cpu", progress: bool = False,
                       ) -> Iterator[Tuple[Tensor, Tensor]]:
    """(owners (F,), maps (F, C, h, w)) batches of at most batch_size images in sample order: maps[i] is
    the backbone's output for an image of samples[owners[i]]. A sample whose images are all unreadable
    gets no row; each unreadable input goes to `unreadables` (which raises when strict).
    Maps holding NaN or Inf raise a ValueError naming the sample and image."""
    unreadables = unreadables if unreadables is not None else Unreadables()
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
        except OSError as error:  # missing, or a folder that cannot be listed
            unreadables.add(Unreadable(sample.id, str(Path(root) / sample.id), str(error)))
            continue
        for path in paths:
            try:
                pending.append((owner, path, load_images([path], size)))
            except (OSError, ValueError) as error:  # not a regular file; PIL's unreadable, truncated, unknown formats
                unreadables.add(Unreadable(sample.id, str(path), f"{type(error).__name__}: {error}"))
                continue
            if len(pending) == batch_size:
                yield run_backbone()
    if pending:
        yield run_backbone()
