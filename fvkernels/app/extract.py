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
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from fvkernels.app.backbones import Backbone
from fvkernels.app.corpus import Sample, Unreadable, activation_batches, check_root, digest_samples
from fvkernels.app.distributed import default_device
from fvkernels.app.video import check_frames_per_video, video_fisher_vectors
from fvkernels.common import collectives
from fvkernels.common.files import atomic_write, sha256_text, state_digest
from fvkernels.nn import FVVAE
from fvkernels.ops import dispatch

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fvkernels.extract"
MANIFEST_VERSION = 1
DTYPES = ("float16", "float32")
LAYOUT = "fv[n, c*(d+1) + j] = G[c, j]: row-major over (C, d+1), bias column last (DESIGN.md §1.8)"


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
    folder is refused before `out` is touched; a corpus none of whose samples could be read is refused
    after, and its files are removed, so that the corrected command can use the same `out`.
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
        check_root(root)
        _claim_folder(out, job, job_hash)

    collectives.on_main(check_inputs_and_claim_output, distributed)

    params = model.to_params()
    mine = range(rank, len(shards), processes)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):  # same bytes on a rerun
        for index in tqdm(mine, desc=f"FV-VAE extraction (process {rank} of {processes})", unit="shard",
                          disable=not progress or rank != 0):
            if _is_complete(out, index, job_hash):
                continue
            fv, kept, unreadable = _encode_shard(shards[index], root, params, backbone, options, strict, device)
            _write_shard(out, index, job_hash, shards[index], fv.cpu().numpy().astype(dtype), kept, unreadable)
            if on_shard_written is not None:
                on_shard_written(index)
    collectives.barrier(distributed)
    return collectives.on_main(lambda: _write_manifest(out, job, job_hash, len(shards), model.dim, dtype), distributed)


def load_fisher_vectors(out) -> Tuple[List[str], Optional[List[int]], np.ndarray]:
    """(sample ids, labels or None, (n, D) array) of a complete extraction folder, in sample order."""
    manifest = read_manifest(out)
    if not manifest.get("complete"):
        raise ValueError(f"the extraction in {str(out)!r} is not complete; rerun the same extract command to finish it")
    ids = [sample for shard in manifest["shards"] for sample in shard["samples"]]
    labelled = all(shard["labels"] is not None for shard in manifest["shards"])
    labels = [label for shard in manifest["shards"] for label in shard["labels"]] if labelled else None
    arrays = [np.load(Path(out) / shard["file"]) for shard in manifest["shards"]]
    return ids, labels, np.concatenate(arrays) if arrays else np.zeros((0, manifest["dim"]), manifest["dtype"])


def read_manifest(out) -> dict:
    path = Path(out) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {str(out)!r}: not an fvkernels extraction folder")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
                         f"fvkernels reads {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}")
    return manifest


# ---- the folder ------------------------------------------------------------------------------------------

def _canonical(value):
    """value as it reads back from JSON (tuples become lists), so a stored job compares equal."""
    return json.loads(json.dumps(value))


def _write_json(path: Path, value: dict) -> None:
    text = json.dumps(value, sort_keys=True, indent=1) + "\n"  # fixed key order: same content, same bytes
    atomic_write(path, lambda handle: handle.write(text.encode()))


def _claim_folder(out: Path, job: dict, job_hash: str) -> None:
    """Checks that `out` is new, empty, or an extraction with this hash; starts its manifest; removes the
    temporary files a killed run left."""
    path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; extract into a new or empty folder, or an unfinished "
                         "extraction's folder")
    if path.exists():
        previous = read_manifest(out)
        if previous["hash"] != job_hash:
            changes = "; ".join(_differences(previous["job"], job)) or "the hash differs"
            raise ValueError(f"{str(out)!r} holds an extraction made with another model, backbone, options or sample "
                             f"list ({changes}). Extract into a new --out folder, or delete {str(out)!r} to start over")
    elif out.exists() and any(not entry.name.startswith(".") for entry in out.iterdir()):
        raise ValueError(f"{str(out)!r} is not empty and has no {MANIFEST}; extract into a new or empty folder")
    else:
        _write_json(path, {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "hash": job_hash, "job": job,
                           "complete": False})
    for temporary in out.glob(".*.tmp"):
        temporary.unlink()


def _differences(old, new, prefix: str = "") -> List[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in sorted(set(old) | set(new))
                for change in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} → {new!r}"]


def _shard_names(index: int) -> Tuple[str, str]:
    return f"shard-{index:05d}.npy", f"shard-{index:05d}.json"


def _is_complete(out: Path, index: int, job_hash: str) -> bool:
    path = out / _shard_names(index)[1]
    if not path.exists():
        return False
    if json.loads(path.read_text())["hash"] != job_hash:
        raise ValueError(f"{path} was written by another extraction than {out / MANIFEST} describes; delete "
                         f"{str(out)!r} and extract again")
    return True


# ---- one shard -------------------------------------------------------------------------------------------

@torch.no_grad()
def _encode_shard(shard: List[Sample], root, params, backbone: Backbone, options: dict, strict: bool, device):
    """(FVs of the encoded samples, their positions in the shard, unreadable inputs)."""
    unreadable: List[Unreadable] = []
    images_per_sample = torch.zeros(len(shard), dtype=torch.int64)

    def maps_by_sample():
        for owners, maps in activation_batches(shard, root, backbone, frames_per_video=options["frames_per_video"],
                                               batch_size=options["batch_size"], strict=strict,
                                               unreadable=unreadable, device=device):
            owner_ids, counts = torch.unique_consecutive(owners, return_counts=True)
            for owner, part in zip(owner_ids.tolist(), maps.split(counts.tolist())):
                images_per_sample[owner] += len(part)
                yield owner, part

    fv = video_fisher_vectors(maps_by_sample(), len(shard), params, backend=options["backend"])
    kept = images_per_sample.nonzero().flatten()
    return fv[kept.to(fv.device)], kept.tolist(), unreadable


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
    indexes = [json.loads((out / _shard_names(index)[1]).read_text()) for index in range(num_shards)]
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
