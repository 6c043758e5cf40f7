"""Files that are never half-written, and the digests that identify models and data: shared by the
training checkpoints and the extraction shards."""
from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Callable, List, Optional, Union

import torch
from torch import Tensor, nn

# Temporary files carry this marker, the host and the writing process's id:
# `.{name}.fvkernels-<host>-<pid>-<random>.tmp`.
# Cleaning up after a killed writer then removes only files that fvkernels made and whose writer is gone, never
# a user's file that happens to end in .tmp, nor the file another live process is writing.
TEMPORARY_MARKER = "fvkernels"
# A writer on another host cannot be asked whether it lives; a temporary file is written in one go and renamed
# within seconds, so one untouched for this long belongs to a writer that died.
FOREIGN_TEMPORARY_AGE_S = 3600.0


def _host() -> str:
    return socket.gethostname().replace("-", "_").replace(".", "_") or "host"


def atomic_write(path: Union[str, Path], write: Callable[[IO[bytes]], None]) -> None:
    """write(handle) into a temporary file in the same folder, fsync, then rename: a crash leaves either
    the old file or the new one, never a partial file under the final name. Temporary names are
    hidden and say who wrote them (TEMPORARY_MARKER); remove_stale_temporaries removes a killed writer's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.{TEMPORARY_MARKER}-{_host()}-{os.getpid()}-",
                                             suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o666 & ~_umask())  # mkstemp's 0600 would hide shared outputs from other users
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        _name_the_file(error, path)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable, not only the file's bytes
        os.fsync(folder)
    except OSError as error:
        _name_the_file(error, path)
        raise
    finally:
        os.close(folder)


def _name_the_file(error: BaseException, path: Path) -> None:
    """Gives an OSError without a file name ("No space left on device" — writing what?) the path written."""
    if isinstance(error, OSError) and error.filename is None:
        error.filename = str(path)


def _umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return umask


def _writer_is_gone(temporary: Path, host: str, pid: int) -> bool:
    if host != _host():
        try:
            return time.time() - temporary.stat().st_mtime > FOREIGN_TEMPORARY_AGE_S
        except FileNotFoundError:
            return False
    if pid == os.getpid():
        return False  # this process may be writing it right now (another thread)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temporaries(folder: Union[str, Path], name: Optional[str] = None) -> List[Path]:
    """Removes the temporary files that atomic_write left in `folder` (for final name `name`, or any) when its
    writer was killed: only files with fvkernels' marker whose writing process no longer runs (on this host), or,
    from another host, that nobody touched for FOREIGN_TEMPORARY_AGE_S. Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(r"^\.(?P<name>.+)\." + TEMPORARY_MARKER + r"-(?P<host>[^-]+)-(?P<pid>\d+)-[^.]*\.tmp$")
    removed = []
    for entry in folder.iterdir():
        match = pattern.match(entry.name)
        if match is None or (name is not None and match["name"] != name) or not entry.is_file():
            continue
        if _writer_is_gone(entry, match["host"], int(match["pid"])):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


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


def content_digest(value) -> str:
    """sha256 of nested dicts, lists and tuples of tensors and plain values (a checkpoint's contents): what a
    file that unpickles without error but changed on disk (a flipped bit in a weight) is caught by."""
    digest = hashlib.sha256()

    def visit(item) -> None:
        if isinstance(item, dict):
            digest.update(f"dict {len(item)}\n".encode())
            for key in sorted(item, key=repr):
                digest.update(f"{key!r}:".encode())
                visit(item[key])
        elif isinstance(item, (list, tuple)):
            digest.update(f"{type(item).__name__} {len(item)}\n".encode())
            for element in item:
                visit(element)
        elif isinstance(item, Tensor):
            digest.update(f"tensor {item.dtype} {tuple(item.shape)}\n".encode())
            digest.update(tensor_bytes(item))
        else:
            digest.update(f"{item!r}\n".encode())

    visit(value)
    return digest.hexdigest()
