"""Videos: UCF101-style frame folders and split files → per-frame conv maps → video-level FV-VAE.

A video's Fisher vector is the mean of its frames' raw Fisher vectors (the official release's
extract_fv_vae_frame_sequence.m), then the improved normalisation. Frames are encoded in batches that
may span videos; only one running sum per video is kept, never the per-frame vectors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from fvkernels.app.listfile import list_file_lines, open_regular_file, whitespace_fields
from fvkernels.common import extras
from fvkernels.common.tensors import improved_normalisation
from fvkernels.pipeline import FVVAEParams, fv_vae_encode

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def read_class_index(path) -> Dict[str, int]:
    """UCF101's classInd.txt ("1 ApplyEyeMakeup" per line) → {class name: 0-based label}."""
    lines = list_file_lines(path, "the class index", "'<index ≥ 1> <class name>'", whitespace_fields(2, number_at=0,
                                                                                                      minimum=1))
    return {name: index - 1 for _, (index, name) in lines}


def read_split(path, class_index: Optional[Dict[str, int]] = None) -> List[Tuple[str, int]]:
    """A split file (trainlist01.txt: "Class/v_Class_g08_c01.avi 1"; testlist01.txt: "Class/v_….avi") →
    [(video id without extension, 0-based label)]. Lines without a label take it from class_index."""
    videos = []
    for number, fields in list_file_lines(path, "the split file", "'Class/video.avi [label ≥ 1]'",
                                          whitespace_fields(1, 2, number_at=1, minimum=1)):
        video = str(Path(fields[0]).with_suffix(""))
        if len(fields) > 1:
            label = fields[1] - 1
        elif class_index is not None and Path(video).parts[0] in class_index:
            label = class_index[Path(video).parts[0]]
        else:
            raise ValueError(f"{path}:{number}: no label on the line and class {Path(video).parts[0]!r} is not in "
                             "the class index; pass read_class_index('classInd.txt')")
        videos.append((video, label))
    return videos


def video_frame_paths(root, video: str) -> List[Path]:
    """The frame images of `video` under root (root/Class/v_…/frame_0001.jpg …), in name order."""
    folder = Path(root) / video
    if not folder.is_dir():
        raise FileNotFoundError(f"no frame folder {str(folder)!r} for video {video!r}; extract the frames first")
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not frames:
        raise FileNotFoundError(f"frame folder {str(folder)!r} holds no images ({', '.join(FRAME_SUFFIXES)})")
    return frames


def check_frames_per_video(count: Optional[int]) -> None:
    if count is not None and count < 1:
        raise ValueError(f"frames per video must be a positive number, or None for all frames; got {count}")


def sample_frames(frames: Sequence, count: Optional[int]) -> list:
    """`count` frames evenly spaced over the video (all frames when count is None or larger)."""
    check_frames_per_video(count)
    if count is None or count >= len(frames):
        return list(frames)
    step = len(frames) / count
    return [frames[int(step * (i + 0.5))] for i in range(count)]


def load_images(paths: Sequence, size: Tuple[int, int]) -> Tensor:
    """RGB images resized to size = (height, width), as (F, 3, H, W) floats in [0, 1]. A path that is not a
    readable image raises OSError or ValueError naming it; a FIFO, device or socket is refused without being
    opened (open_regular_file), so that a hostile corpus cannot make the reader wait forever."""
    Image = extras.load("images", "reading images and frames (Pillow)", "PIL.Image")
    images = []
    for path in paths:
        try:
            with open_regular_file(path, "only image files and folders of them are read") as handle, \
                    Image.open(handle) as image:
                rgb = image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
        except (EOFError, SyntaxError, Image.DecompressionBombError) as error:  # PIL's refusals that are no OSError
            raise ValueError(f"{str(path)!r} is not a readable image ({type(error).__name__}: {error})") from error
        images.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(images)


def video_fisher_vectors(frame_maps: Iterable[Tuple[int, Tensor]], num_videos: int, params: FVVAEParams, *,
                         normalize: bool = True, backend: str = "auto") -> Tensor:
    """Video FVs from a stream of (video index, frame conv maps (F, C, H, W)) batches.

    A video's frames may arrive in several batches; the result is the mean raw FV over all its frames,
    then signed √ and L2. Videos that received no frame give the zero vector.
    """
    sums: Optional[Tensor] = None
    counts = torch.zeros(num_videos, dtype=torch.int64)
    for video, maps in frame_maps:
        if not 0 <= video < num_videos:
            raise ValueError(f"video index {video} outside [0, {num_videos})")
        raw = fv_vae_encode(maps, params, normalize=False, backend=backend)
        if sums is None:
            sums = torch.zeros((num_videos, raw.shape[1]), dtype=torch.float32, device=raw.device)
        sums[video] += raw.float().sum(0)
        counts[video] += raw.shape[0]
    if sums is None:
        return torch.zeros((num_videos, params.dim), dtype=torch.float32)
    fv = sums / counts.clamp_min(1).to(sums.device)[:, None]
    return improved_normalisation(fv) if normalize else fv


def frame_batches(videos: Sequence[Sequence], load: Callable[[Sequence], Tensor], extract: Callable[[Tensor], Tensor],
                  frames_per_batch: int = 64) -> Iterable[Tuple[int, Tensor]]:
    """(video index, conv maps) batches for video_fisher_vectors: `load` turns frame paths into images,
    `extract` images into conv maps (e.g. a CNN up to pool5)."""
    for index, frames in enumerate(videos):
        for begin in range(0, len(frames), frames_per_batch):
            with torch.no_grad():
                yield index, extract(load(frames[begin: begin + frames_per_batch]))
