"""Fashion-MNIST from IDX files (Debian's dataset-fashion-mnist, or any folder holding the four files), and its
"translated" variant: the items at random positions of a larger canvas."""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fvkernels.app.listfile import open_regular_file

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """An IDX file (optionally gzipped), the MNIST family's format: magic, dims (big-endian), data. A file that
    is not one, or a damaged one (a truncated or corrupt gzip stream, fewer or more values than its header
    says), raises ValueError naming it; only a regular file is opened (fvkernels.app.listfile.open_regular_file)."""
    path = Path(path)
    try:
        with open_regular_file(path, "an IDX file of the MNIST family is expected") as handle:
            data = gzip.GzipFile(fileobj=handle).read() if path.suffix == ".gz" else handle.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ValueError(f"{str(path)!r} is damaged: not a complete gzip stream ({error})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim, dtype = data[3], np.dtype(_IDX_DTYPES[data[2]])
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{str(path)!r} is truncated: {len(data)} bytes, shorter than its {ndim}-d header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    found = (len(data) - header) / dtype.itemsize
    if found != math.prod(shape):
        problem = "is truncated" if found < math.prod(shape) else "is damaged (bytes after its values)"
        raise ValueError(f"{str(path)!r} {problem}: header says {shape}, found {found:g} values")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{stem}[.gz] not found in {str(folder)!r}")


def load_fashion_mnist(split: str, data_dir: Optional[Path] = None) -> Tuple[Tensor, Tensor]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of split "train" (60k) or "test" (10k)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(data_dir) if data_dir is not None else DEBIAN_FASHION_MNIST
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {str(folder)!r}: install Debian's package "
            "(`apt-get install dataset-fashion-mnist`) or pass --data DIR holding the four IDX files")
    prefix = "train" if split == "train" else "t10k"
    images_path, labels_path = _find(folder, f"{prefix}-images-idx3-ubyte"), _find(folder, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{str(images_path)!r} holds {images.dtype} {images.shape}, not (N, 28, 28) uint8 images")
    if labels.ndim != 1 or labels.dtype != np.uint8 or (labels.size and labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise ValueError(f"{str(labels_path)!r} holds {labels.dtype} {labels.shape} values up to "
                         f"{labels.max() if labels.size else None}, not (N,) uint8 labels below "
                         f"{len(FASHION_MNIST_CLASSES)}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split} split has {images.shape[0]} images but {labels.shape[0]} labels in {folder}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def stratified_subset(labels: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Indices of `size` samples with the classes as balanced as the data allows, in random order."""
    if size >= len(labels):
        return torch.randperm(len(labels), generator=generator)
    classes = labels.unique()
    per_class = [(labels == c).nonzero().flatten() for c in classes]
    shuffled = [idx[torch.randperm(len(idx), generator=generator)] for idx in per_class]
    interleaved = torch.stack([s[: min(map(len, shuffled))] for s in shuffled], 1).flatten()
    chosen = interleaved[:size]
    if len(chosen) < size:  # unbalanced data: fill from the remaining samples
        rest = torch.tensor(sorted(set(range(len(labels))) - set(chosen.tolist())))
        chosen = torch.cat([chosen, rest[torch.randperm(len(rest), generator=generator)[: size - len(chosen)]]])
    return chosen[torch.randperm(size, generator=generator)]


def place_on_canvas(images: Tensor, canvas: int, generator: torch.Generator, scale_jitter: float = 1.0) -> Tensor:
    """Each (H, W) uint8 image pasted at a random position of a black canvas × canvas image, optionally resized first
    by a factor drawn log-uniformly from [1/scale_jitter, scale_jitter] (bilinear): the "translated" task, where the
    cells of a CNN map no longer hold the same part of the item across images. Returns (N, canvas, canvas) uint8."""
    if scale_jitter < 1:
        raise ValueError(f"scale_jitter must be ≥ 1 (1: no resizing), got {scale_jitter}")
    height, width = images.shape[1:]
    largest = max(round(height * scale_jitter), round(width * scale_jitter))
    if canvas < largest:
        raise ValueError(f"a {canvas}×{canvas} canvas cannot hold items of {height}×{width} scaled up to ×"
                         f"{scale_jitter:g}; use a canvas of at least {largest} pixels")
    out = torch.zeros(len(images), canvas, canvas, dtype=torch.uint8)
    log_scales = (torch.rand(len(images), generator=generator, dtype=torch.float64) * 2 - 1) * math.log(scale_jitter)
    for index, (image, log_scale) in enumerate(zip(images, log_scales.tolist())):
        size = (max(1, round(height * math.exp(log_scale))), max(1, round(width * math.exp(log_scale))))
        if size != (height, width):
            image = F.interpolate(image[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
            image = image.round().clamp(0, 255).to(torch.uint8)
        top = int(torch.randint(canvas - size[0] + 1, (), generator=generator))
        left = int(torch.randint(canvas - size[1] + 1, (), generator=generator))
        out[index, top: top + size[0], left: left + size[1]] = image
    return out
