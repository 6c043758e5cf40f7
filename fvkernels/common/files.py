"""Files that are never half-written, and the digests that identify models and data: shared by the
training checkpoints and the extraction shards."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Union

import torch
from torch import Tensor, nn


def atomic_write(path: Union[str, Path], write: Callable[[IO[bytes]], None]) -> None:
    """write(handle) into a temporary file in the same folder, fsync, then rename: a crash leaves either
    the old file or the new one, never a partial file under the final name. Temporary names are
    hidden: `.{name}.<random>.tmp`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o666 & ~_umask())  # mkstemp's 0600 would hide shared outputs from other users
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable, not only the file's bytes
        os.fsync(folder)
    finally:
        os.close(folder)


def _umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return umask


def atomic_save(obj, path: Union[str, Path]) -> None:
    """torch.save through atomic_write."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tensor_bytes(tensor: Tensor) -> bytes:
    """A tensor's values as bytes, in row-major order, from any device: what digests of tensors hash."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and values), independent of its device."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()
