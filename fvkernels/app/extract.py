"""Sharded, resumable FV-VAE extraction: a corpus (fvkernels.app.corpus) → Fisher vector shards on disk, on one
process or on every process of a torchrun job.

The output folder holds
  manifest.json     what was extracted and how: the hash of (model, backbone, options, sample list) and
                    its parts, dtype and dimension, the shards with their sample ids, unreadable inputs,
                    dropped samples and counts; `"complete": true` once every shard is written;
  shard-00000.npy   (rows, D) improved Fisher vectors (float16 or float32), one row per encoded sample;
  shard-00000.json  the shard's index: the sample ids and labels of its rows, its unreadable inputs and
                    dropped samples, the sha256 of its .npy.
A sample's vector is the mean of the raw FVs of its images (one for an image, the sampled frames for a
video), then signed √ and L2 — fvkernels.app.video's definition.

Samples (sorted by id) fall into fixed shards of `shard_size` consecutive samples, shard i to process
i mod K. Every file is written under a temporary name, fsynced and renamed, a shard's index last: a
shard is complete iff its index exists, so a killed run never leaves a partial shard that looks
complete. A rerun skips complete shards and computes the others from the same batches with the same
kernels, so its files are byte-identical to those of an uninterrupted run. The number of processes
may change between runs as long as each keeps the same number of CPU threads (the CPU convolutions'
rounding depends on it; torchrun sets OMP_NUM_THREADS=1 for several processes). A rerun with another
model, backbone, options, thread count or sample list (a different hash) is refused, naming what changed.

Nothing damaged passes for data: a rerun checks each complete shard's .npy against its index (sha256, rows,
dimension, dtype) and computes a missing or damaged one again, saying so; a damaged manifest is rebuilt when the
folder's shards are this job's; load_fisher_vectors checks every shard's sha256 and refuses a damaged one. Every
file read back (manifest, shard index, shard) that is truncated, not JSON, lacks a field or holds one of the
wrong type is named as damaged (DamagedFile, a ValueError). Claiming a folder removes only the temporary files
of fvkernels writers that are gone (fvkernels.common.files.remove_stale_temporaries), never a user's file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from fvkernels.app.backbones import Backbone
from fvkernels.app.corpus import (
    Sample,
    Unreadable,
    Unreadables,
    activation_batches,
    check_image_batch_memory,
    check_memory,
    check_root,
    digest_samples,
)
from fvkernels.app.distributed import default_device
from fvkernels.app.listfile import NotARegularFile, open_regular_file
from fvkernels.app.video import check_frames_per_video, video_fisher_vectors
from fvkernels.common import collectives
from fvkernels.common.files import atomic_write, remove_stale_temporaries, sha256_text, state_digest
from fvkernels.nn import FVVAE
from fvkernels.ops import dispatch

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fvkernels.extract"
MANIFEST_VERSION = 1
DTYPES = ("float16", "float32")
LAYOUT = "fv[n, c*(d+1) + j] = G[c, j]: row-major over (C, d+1), bias column last (DESIGN.md §1.8)"
RERUN = "rerun the same extract command to compute it again"
NOT_A_FILE = "is damaged: not a regular file (a folder, FIFO, device or socket has its name)"
# Copies of a shard's vectors alive while it is written: the float32 sums, their normalised copy, the encoded
# rows, the host copy, its dtype cast and the .npy bytes.
SHARD_COPIES = 6


class DamagedFile(ValueError):
    """A file of an extraction folder that cannot be what fvkernels wrote: missing, truncated, not JSON, a field
    missing or of the wrong type, or bytes whose sha256 is not the recorded one. The message names the file, says
    what is wrong with it (`problem`) and what to do (`advice`)."""

    def __init__(self, path: Path, problem: str, advice: str = "") -> None:
        self.path, self.problem, self.advice = path, problem, advice
        super().__init__(f"{path} {problem}" + (f"; {advice}" if advice else ""))

    def advising(self, advice: str) -> "DamagedFile":
        return DamagedFile(self.path, self.problem, advice)


def extract(samples: Sequence[Sample], root, model: FVVAE, backbone: Backbone, out, *, dtype: str = "float16",
            shard_size: int = 256, batch_size: int = 32, frames_per_video: Optional[int] = None, strict: bool = False,
            device=None, distributed: bool = False, progress: bool = True,
            on_shard_written: Optional[Callable[[int], None]] = None) -> dict:
    """Encodes `samples` (under `root`; shards follow their order, which read_sample_list sorts by id) with
    `backbone` then `model` into shards in `out`; returns the manifest.

    Resumes a folder written by an interrupted run with the same inputs and refuses one written with
    others. batch_size: images per backbone batch (part of the hash: it decides the exact arithmetic).
    strict: an unreadable input fails the run instead of being skipped. distributed: every process of
    the job calls this with the same arguments and writes its shards; process 0 writes the manifest.
    on_shard_written(shard index) is called after each shard this process writes. A root that is not a
    folder or holds none of the samples (check_root), and an image batch or shard that would not fit in the
    memory available, are refused before `out` is touched; a corpus none of whose samples could be read is
    refused after, and its files are removed, so that the corrected command can use the same `out`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    check_frames_per_video(frames_per_video)
    rank, processes = collectives.rank_and_size(distributed)
    device = torch.device(device) if device is not None else default_device(distributed)
    model.to(device)
    backbone.to(device)
    # The CPU convolutions' results depend on the number of threads (the FV kernel's do not), so the
    # hash covers it: torchrun gives each of several processes OMP_NUM_THREADS=1. On a GPU the tiling
    # (Triton's autotuner, the split of long sets by SM count) depends on the card, so the hash names it;
    # the autotuner may still pick another tile shape after a restart, so GPU reruns agree to rounding,
    # not to the byte (CPU reruns do).
    options = dict(dtype=dtype, shard_size=shard_size, batch_size=batch_size, frames_per_video=frames_per_video,
                   root=str(Path(root).resolve()), backend=dispatch.resolve(model.backend, device, torch.float32),
                   cpu_threads=torch.get_num_threads() if device.type == "cpu" else None,
                   gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    job = _canonical({"model": {"config": model.config, "state_sha256": state_digest(model)},
                      "backbone": backbone.spec, "options": options,
                      "samples": {"count": len(samples), "sha256": digest_samples(samples)}})
    job_hash = sha256_text(json.dumps(job, sort_keys=True))
    out = Path(out)
    shards = [list(samples[begin: begin + shard_size]) for begin in range(0, len(samples), shard_size)]

    def check_inputs_and_claim_output():
        check_root(root, samples)
        check_image_batch_memory(backbone, batch_size, device)
        rows = min(shard_size, len(samples))
        check_memory(SHARD_COPIES * rows * model.dim * 4, device, f"a shard of {rows} Fisher vectors of {model.dim} "
                     f"dimensions (--shard-size {shard_size})", "choose a smaller --shard-size")
        _claim_folder(out, job, job_hash)

    collectives.on_main(check_inputs_and_claim_output, distributed)

    params = model.to_params()
    mine = range(rank, len(shards), processes)
    unreadables = Unreadables(strict)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):  # same bytes on a rerun
        for index in tqdm(mine, desc=f"FV-VAE extraction (process {rank} of {processes})", unit="shard",
                          disable=not progress or rank != 0):
            if _is_complete(out, index, job_hash, model.dim, dtype):
                continue
            fv, kept, unreadable = _encode_shard(shards[index], root, params, backbone, options, unreadables, device)
            _write_shard(out, index, job_hash, shards[index], fv.cpu().numpy().astype(dtype), kept, unreadable)
            if on_shard_written is not None:
                on_shard_written(index)
    collectives.barrier(distributed)
    return collectives.on_main(lambda: _write_manifest(out, job, job_hash, len(shards), model.dim, dtype), distributed)


def load_fisher_vectors(out) -> Tuple[List[str], Optional[List[int]], np.ndarray]:
    """(sample ids, labels or None, (n, D) array) of a complete extraction folder, in sample order. Every shard's
    bytes are checked against the sha256 the manifest records: a damaged or missing one raises DamagedFile naming
    it (rerunning the extract command computes it again)."""
    manifest = read_manifest(out)
    if not manifest["complete"]:
        raise ValueError(f"the extraction in {str(out)!r} is not complete; rerun the same extract command to finish it")
    ids = [sample for shard in manifest["shards"] for sample in shard["samples"]]
    labelled = all(shard["labels"] is not None for shard in manifest["shards"])
    labels = [label for shard in manifest["shards"] for label in shard["labels"]] if labelled else None
    arrays = []
    for shard in manifest["shards"]:
        try:
            arrays.append(_read_shard_array(Path(out) / shard["file"], shard, manifest["dim"], manifest["dtype"]))
        except DamagedFile as damage:
            raise damage.advising(f"{RERUN}, then load again") from None
    return ids, labels, np.concatenate(arrays) if arrays else np.zeros((0, manifest["dim"]), manifest["dtype"])


def read_manifest(out) -> dict:
    """The manifest of extraction folder `out`, its fields checked (DamagedFile names what is wrong)."""
    path = Path(out) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {str(out)!r}: not an fvkernels extraction folder")
    advice = "rerun the same extract command to rebuild it from the shards"
    manifest = _read_json(path, advice)
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
                         f"fvkernels reads {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}")
    _check_fields(path, manifest, _MANIFEST_FIELDS, advice)
    if manifest["complete"]:
        _check_fields(path, manifest, _COMPLETE_MANIFEST_FIELDS, advice)
        for position, shard in enumerate(manifest["shards"]):
            _check_fields(path, shard, _MANIFEST_SHARD_FIELDS, advice, f"shards[{position}].")
            _check_rows(path, shard, advice, f"shards[{position}].")
    return manifest


# ---- reading back what was written -----------------------------------------------------------------------

def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_list_of(kind) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(isinstance(item, kind) and not isinstance(item, bool)
                                                         for item in value)


def _is_name(pattern: str) -> Callable[[Any], bool]:  # a file name of the folder, never a path out of it
    return lambda value: isinstance(value, str) and re.fullmatch(pattern, value) is not None


def _is_unreadable_list(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(record, dict) and all(isinstance(record.get(key), str) for key in ("sample", "path", "reason"))
        for record in value)


def _is_sha256(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


# What each file's fields must hold (a check of the written types, so that damage shows as damage, never as a
# KeyError or a TypeError far from the file)
_SHARD_FIELDS: Dict[str, Callable[[Any], bool]] = {
    "file": _is_name(r"shard-\d{5,}\.npy"), "rows": _is_count, "sha256": _is_sha256, "samples": _is_list_of(str),
    "labels": lambda value: value is None or _is_list_of(int)(value),
}
_SHARD_INDEX_FIELDS = {**_SHARD_FIELDS, "hash": _is_sha256, "shard": _is_count, "unreadable": _is_unreadable_list,
                       "dropped": _is_list_of(str)}
_MANIFEST_SHARD_FIELDS = {**_SHARD_FIELDS, "index": _is_name(r"shard-\d{5,}\.json")}
_MANIFEST_FIELDS = {"hash": _is_sha256, "job": lambda value: isinstance(value, dict),
                    "complete": lambda value: isinstance(value, bool)}
_COMPLETE_MANIFEST_FIELDS = {
    "dtype": lambda value: value in DTYPES, "dim": lambda value: _is_count(value) and value > 0,
    "shards": _is_list_of(dict), "unreadable": _is_unreadable_list, "dropped": _is_list_of(str),
    "counts": lambda value: isinstance(value, dict) and all(map(_is_count, value.values())),
}


def _read_json(path: Path, advice: str) -> dict:
    """The JSON object in `path`, or DamagedFile when it is not one (truncated, edited, not text)."""
    try:
        with open_regular_file(path, "fvkernels writes its manifest and shard indexes as files") as handle:
            value = json.loads(handle.read().decode())
    except NotARegularFile:
        raise DamagedFile(path, NOT_A_FILE, advice) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedFile(path, f"is damaged: not JSON text ({error})", advice) from None
    if not isinstance(value, dict):
        raise DamagedFile(path, f"is damaged: it holds a JSON {type(value).__name__}, not an object", advice)
    return value


def _check_fields(path: Path, value: dict, fields: Dict[str, Callable[[Any], bool]], advice: str, where: str = ""):
    for key, valid in fields.items():
        if key not in value:
            raise DamagedFile(path, f"is damaged: it has no field {where}{key}", advice)
        if not valid(value[key]):
            raise DamagedFile(path, f"is damaged: field {where}{key} holds {_excerpt(value[key])}", advice)


def _check_rows(path: Path, shard: dict, advice: str, where: str = "") -> None:
    for key in ("samples", "labels"):
        if shard[key] is not None and len(shard[key]) != shard["rows"]:
            raise DamagedFile(path, f"is damaged: {where}{key} has {len(shard[key])} entries for {shard['rows']} rows",
                              advice)


def _excerpt(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "…"


def _read_shard_index(path: Path, index: int) -> dict:
    """Shard `index`'s index file, its fields checked."""
    index_file = _read_json(path, RERUN)
    _check_fields(path, index_file, _SHARD_INDEX_FIELDS, RERUN)
    _check_rows(path, index_file, RERUN)
    if index_file["shard"] != index or index_file["file"] != _shard_names(index)[0]:
        raise DamagedFile(path, f"is damaged: it describes shard {index_file['shard']} ({index_file['file']})", RERUN)
    return index_file


def _read_shard_array(path: Path, shard: dict, dim: int, dtype: str) -> np.ndarray:
    """The (rows, dim) vectors of shard file `path` once its bytes match the sha256 `shard` records, else
    DamagedFile naming it (without advice: the callers know what to do)."""
    try:
        with open_regular_file(path, "a shard is a .npy file fvkernels writes") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise DamagedFile(path, "is missing") from None
    except NotARegularFile:
        raise DamagedFile(path, NOT_A_FILE) from None
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise DamagedFile(path, "is damaged: its sha256 is not the one recorded when it was written")
    try:  # the bytes are those written: a header that disagrees means the index was edited along with them
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        raise DamagedFile(path, f"is damaged: not a .npy array ({error})") from None
    if array.shape != (shard["rows"], dim) or array.dtype != np.dtype(dtype):
        raise DamagedFile(path, f"is damaged: it holds {array.dtype} {array.shape}, not {dtype} ({shard['rows']}, "
                                f"{dim})")
    return array


# ---- the folder ------------------------------------------------------------------------------------------

def _canonical(value):
    """value as it reads back from JSON (tuples become lists), so a stored job compares equal."""
    return json.loads(json.dumps(value))


def _write_json(path: Path, value: dict) -> None:
    text = json.dumps(value, sort_keys=True, indent=1) + "\n"  # fixed key order: same content, same bytes
    atomic_write(path, lambda handle: handle.write(text.encode()))


def _claim_folder(out: Path, job: dict, job_hash: str) -> None:
    """Checks that `out` is new, empty, or an extraction with this hash; starts its manifest (or rebuilds a damaged
    one of this job's); removes the temporary files of fvkernels writers that are gone."""
    path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; extract into a new or empty folder, or an unfinished "
                         "extraction's folder")
    previous = None
    if path.exists():
        try:
            previous = read_manifest(out)
        except DamagedFile as damage:
            _check_rebuildable(out, job_hash, damage)
            tqdm.write(f"fvkernels: {path} {damage.problem}; the shards are this job's: rebuilding it",
                       file=sys.stderr)
        if previous is not None and previous["hash"] != job_hash:
            changes = "; ".join(_differences(previous["job"], job)) or "the hash differs"
            raise ValueError(f"{str(out)!r} holds an extraction made with another model, backbone, options or sample "
                             f"list ({changes}). Extract into a new --out folder, or delete {str(out)!r} to start over")
    elif out.exists() and any(not entry.name.startswith(".") for entry in out.iterdir()):
        raise ValueError(f"{str(out)!r} is not empty and has no {MANIFEST}; extract into a new or empty folder")
    if previous is None:
        _write_json(path, {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "hash": job_hash, "job": job,
                           "complete": False})
    remove_stale_temporaries(out)


def _check_rebuildable(out: Path, job_hash: str, damage: DamagedFile) -> None:
    """Accepts rebuilding a damaged manifest only when the folder's shard indexes show it is this job's: at least
    one carries its hash and none another's (a broken file of someone else's is never overwritten)."""
    hashes = set()
    for index_path in out.glob("shard-*.json"):
        try:
            hashes.add(_read_json(index_path, RERUN).get("hash"))
        except DamagedFile:
            continue  # checked, and recomputed if it is one of this job's, when its turn comes
    if hashes != {job_hash}:
        whose = "no shard index says whose it is" if not hashes else "its shards are another extraction's"
        raise damage.advising(f"it cannot be rebuilt ({whose}): delete {str(out)!r} to start over, or extract into a "
                              "new --out folder") from None


def _differences(old, new, prefix: str = "") -> List[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in sorted(set(old) | set(new))
                for change in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} → {new!r}"]


def _shard_names(index: int) -> Tuple[str, str]:
    return f"shard-{index:05d}.npy", f"shard-{index:05d}.json"


def _is_complete(out: Path, index: int, job_hash: str, dim: int, dtype: str) -> bool:
    """Whether shard `index` is written and intact. A damaged or missing .npy, or a damaged index, is reported
    and left to be computed again; an index written by another extraction is refused."""
    npy_name, index_name = _shard_names(index)
    if not (out / index_name).exists():
        return False
    try:
        index_file = _read_shard_index(out / index_name, index)
        if index_file["hash"] == job_hash:
            _read_shard_array(out / npy_name, index_file, dim, dtype)
    except DamagedFile as damage:
        tqdm.write(f"fvkernels: {damage.path} {damage.problem}: computing shard {index} again", file=sys.stderr)
        return False
    if index_file["hash"] != job_hash:
        raise ValueError(f"{out / index_name} was written by another extraction than {out / MANIFEST} describes; "
                         f"delete {str(out)!r} and extract again")
    return True


# ---- one shard -------------------------------------------------------------------------------------------

@torch.no_grad()
def _encode_shard(shard: List[Sample], root, params, backbone: Backbone, options: dict, unreadables: Unreadables,
                  device):
    """(FVs of the encoded samples, their positions in the shard, its unreadable inputs)."""
    first_unreadable = len(unreadables.records)
    images_per_sample = torch.zeros(len(shard), dtype=torch.int64)

    def maps_by_sample():
        for owners, maps in activation_batches(shard, root, backbone, frames_per_video=options["frames_per_video"],
                                               batch_size=options["batch_size"], unreadables=unreadables,
                                               device=device):
            owner_ids, counts = torch.unique_consecutive(owners, return_counts=True)
            for owner, part in zip(owner_ids.tolist(), maps.split(counts.tolist())):
                images_per_sample[owner] += len(part)
                yield owner, part

    fv = video_fisher_vectors(maps_by_sample(), len(shard), params, backend=options["backend"])
    kept = images_per_sample.nonzero().flatten()
    return fv[kept.to(fv.device)], kept.tolist(), unreadables.records[first_unreadable:]


def _write_shard(out: Path, index: int, job_hash: str, shard: List[Sample], fv: np.ndarray, kept: List[int],
                 unreadable: List[Unreadable]) -> None:
    npy_name, index_name = _shard_names(index)
    buffer = io.BytesIO()
    np.save(buffer, fv)
    data = buffer.getvalue()
    atomic_write(out / npy_name, lambda handle: handle.write(data))
    labelled = all(sample.label is not None for sample in shard)
    kept_set = set(kept)
    _write_json(out / index_name, {  # last: its presence marks the shard complete
        "hash": job_hash, "shard": index, "file": npy_name, "rows": len(kept), "sha256": hashlib.sha256(data).hexdigest(),
        "samples": [shard[i].id for i in kept], "labels": [shard[i].label for i in kept] if labelled else None,
        "unreadable": [dataclasses.asdict(record) for record in unreadable],
        "dropped": [sample.id for i, sample in enumerate(shard) if i not in kept_set],
    })


def _write_manifest(out: Path, job: dict, job_hash: str, num_shards: int, dim: int, dtype: str) -> dict:
    indexes = [_read_shard_index(out / _shard_names(index)[1], index) for index in range(num_shards)]
    shards = [dict(index=_shard_names(index)[1], **{key: entry[key] for key in ("file", "rows", "sha256", "samples",
                                                                             "labels")})
              for index, entry in enumerate(indexes)]
    unreadable = [record for entry in indexes for record in entry["unreadable"]]
    dropped = [sample for entry in indexes for sample in entry["dropped"]]
    if dropped and len(dropped) == job["samples"]["count"]:
        # Most likely the wrong root: clear this job's files, so that the folder takes the corrected command
        for index in range(num_shards):
            for name in _shard_names(index):
                (out / name).unlink()
        (out / MANIFEST).unlink()
        paths = [record["path"] for record in unreadable[:3]]
        raise ValueError(f"none of the {len(dropped)} samples could be read (unreadable: {', '.join(paths)}"
                         f"{', …' if len(unreadable) > 3 else ''}); check --root {job['options']['root']!r} and the "
                         f"list. Nothing was kept in {str(out)!r}")
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "hash": job_hash, "job": job, "complete": True,
        "dtype": dtype, "dim": dim, "layout": LAYOUT,
        "counts": {"samples": job["samples"]["count"], "encoded": sum(entry["rows"] for entry in indexes),
                   "dropped": len(dropped), "unreadable_inputs": len(unreadable)},
        "shards": shards, "unreadable": unreadable, "dropped": dropped,
    }
    _write_json(out / MANIFEST, manifest)
    return manifest
