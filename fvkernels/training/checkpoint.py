"""The training checkpoint: its format, writing it atomically, reading it back, and deciding whether a run may
resume from it."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from fvkernels.common.checks import check_finite_tensors
from fvkernels.common.files import atomic_save, content_digest, remove_stale_temporaries
from fvkernels.nn import FVVAE

CHECKPOINT_FORMAT = "fvkernels.FVVAE"
# Version 2 added `input_spec` and draws each set's training noise from its own seed; a version-1 file
# still loads as a model, but resuming its training would not continue the run it came from.
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives


def save_checkpoint(path, model: FVVAE, optimizer: Optional[torch.optim.Optimizer] = None, iteration: int = 0,
                    history: Sequence[dict] = (), input_spec: Optional[dict] = None,
                    training: Optional[dict] = None, modules: Optional[Dict[str, nn.Module]] = None) -> None:
    """input_spec: what turns raw data into the layer's input (the `fvkernels train` command stores its
    backbone, layer, image size and weights digest), checked again on resume and by `fvkernels extract`.
    training: the run's options that decide its result (seed, batch size, lr, number of sets, data
    fingerprint), checked on resume so that a changed command line does not silently continue another run.
    modules: the other modules trained with the layer (fine-tuning: the backbone's trunk, a classifier on the
    Fisher vectors), stored by name as state dicts."""
    state = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": dict(model.config),
        "model": model.state_dict(), "optimizer": None if optimizer is None else optimizer.state_dict(),
        "iteration": iteration, "history": list(history), "input_spec": input_spec, "training": training,
        "modules": {name: module.state_dict() for name, module in (modules or {}).items()},
    }
    write_checkpoint(path, state)


def _weights(state: dict) -> Dict[str, torch.Tensor]:
    """Every weight a checkpoint holds, by a name that says where: the layer's and those of its other modules."""
    named = {f"model.{name}": tensor for name, tensor in state.get("model", {}).items()}
    for module, weights in (state.get("modules") or {}).items():
        named.update({f"{module}.{name}": tensor for name, tensor in weights.items()})
    return named


def write_checkpoint(path, state: dict) -> None:
    """Writes a checkpoint's state dict atomically with the digest of its contents, after refusing non-finite
    weights (NonFiniteError): a diverged run never replaces the last good file."""
    check_finite_tensors(_weights(state), f"not written to {str(path)!r}, which keeps its last good state")
    state = {key: value for key, value in state.items() if key != "sha256"}
    atomic_save(dict(state, sha256=content_digest(state)), path)


def read_checkpoint(path) -> dict:
    """Loads and checks a checkpoint: its format and version, that its contents are those written (by the digest
    that checkpoints record; errors name a damaged file as damaged) and that its weights are finite."""
    written_by = "written by `fvkernels train` / fvkernels.training.train"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}") from None
    except IsADirectoryError:
        raise ValueError(f"{str(path)!r} is a folder, not an fvkernels checkpoint ({written_by})") from None
    except PermissionError:
        raise  # the file may well be a checkpoint, and the error says what went wrong
    except Exception as error:  # torch.load explains in paragraphs why a file does not unpickle; its type is enough
        raise ValueError(_unreadable(path, error, written_by)) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not an fvkernels FVVAE checkpoint (format {state.get('format')!r} "
                         f"if a dict, expected {CHECKPOINT_FORMAT!r})" if isinstance(state, dict) else
                         f"{str(path)!r} is not an fvkernels FVVAE checkpoint")
    if state.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{str(path)!r} has checkpoint version {state.get('version')!r}; this fvkernels reads "
                         f"version {' or '.join(map(str, READABLE_VERSIONS))} — load it with the fvkernels release "
                         "that wrote it")
    stored = state.pop("sha256", None)
    if stored is not None and stored != content_digest(state):
        raise ValueError(f"checkpoint {str(path)!r} is damaged: its contents differ from those written (sha256 "
                         f"{stored[:12]}… recorded); restore a copy, or delete it and train again")
    check_finite_tensors(_weights(state), f"checkpoint {str(path)!r} holds non-finite weights (written by an fvkernels "
                         "release that did not refuse them); train again from an earlier checkpoint")
    state.setdefault("input_spec", None)
    state.setdefault("modules", {})
    return state


def _unreadable(path, error: Exception, written_by: str) -> str:
    """Why torch.load could not read the file: damaged (empty, or a zip archive — torch.save's format — that does
    not read back), or not a checkpoint at all."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    reason = type(error).__name__  # torch.load's messages run to paragraphs of advice that does not apply here
    if not head:
        return (f"checkpoint {str(path)!r} is damaged: the file is empty (a copy or a save that never finished); "
                "restore a copy, or delete it and train again")
    if head == ZIP_MAGIC:
        return (f"checkpoint {str(path)!r} is damaged (truncated or corrupt): torch.load cannot read it ({reason}); "
                "restore a copy, or delete it and train again")
    return f"{str(path)!r} is not an fvkernels checkpoint ({written_by}): torch.load cannot read it ({reason})"


def check_compatible(state: dict, model: FVVAE, path, input_spec: Optional[dict] = None) -> None:
    """Refuses a checkpoint written for another architecture, other options or (when input_spec is
    given) other inputs, naming what differs."""
    differences = [f"{key}: checkpoint {state['config'].get(key)!r}, model {value!r}"
                   for key, value in model.config.items() if state["config"].get(key) != value]
    if input_spec is not None:
        stored = state["input_spec"] or {}
        differences += [f"input {key}: checkpoint {stored.get(key)!r}, now {input_spec.get(key)!r}"
                        for key in sorted(set(stored) | set(input_spec)) if stored.get(key) != input_spec.get(key)]
    if differences:
        raise ValueError(f"checkpoint {str(path)!r} does not match this model — " + "; ".join(differences))


def load_checkpoint(path, model: Optional[FVVAE] = None) -> FVVAE:
    """The model stored in a checkpoint; into `model` (after checking it matches) or a new FVVAE."""
    state = read_checkpoint(path)
    if model is None:
        model = FVVAE(**state["config"])
    check_compatible(state, model, path)
    model.load_state_dict(state["model"])
    return model


def resume_state(checkpoint, model: FVVAE, input_spec: Optional[dict], training: dict, iterations: int,
                 modules: Optional[Dict[str, nn.Module]] = None) -> Optional[dict]:
    """The checkpoint to resume from, checked against the model, the other modules trained with it and the run's
    options (those of `training` given: train_on_corpus checks some before it computes the sets); None when there
    is none yet. Also checks that the checkpoint can be written, so that a bad path fails before training, not
    after."""
    if checkpoint is None:
        return None
    _check_writable_folder(checkpoint)
    remove_stale_temporaries(Path(checkpoint).parent, Path(checkpoint).name)  # a save that was killed midway
    if not Path(checkpoint).exists():
        return None
    state = read_checkpoint(checkpoint)
    check_compatible(state, model, checkpoint, input_spec)
    _check_modules(state, modules or {}, checkpoint)
    stored = state.get("training") or {}
    changed = [f"{key}: checkpoint {stored.get(key)!r}, now {value!r}" for key, value in training.items()
               if key != "data_fingerprint" and key in stored and stored[key] != value]
    if changed:
        raise ValueError(f"checkpoint {str(checkpoint)!r} was trained with other options — " + "; ".join(changed)
                         + "; resume with the same options, or train into a new checkpoint path")
    fingerprint = training["data_fingerprint"]
    if stored.get("data_fingerprint", fingerprint) != fingerprint:  # checkpoints before fingerprints: unchecked
        raise ValueError(f"the training data differ from those checkpoint {str(checkpoint)!r} was trained on "
                         f"(fingerprint {stored['data_fingerprint'][:12]}…, now {fingerprint[:12]}…); resume with the "
                         "same data (`fvkernels train`: the same list and --frames-per-video), or train into "
                         "a new checkpoint path")
    if state["iteration"] > iterations:
        raise ValueError(f"checkpoint {str(checkpoint)!r} is at step {state['iteration']}, past the {iterations} "
                         "steps asked for; ask for at least as many, or train into a new checkpoint path")
    if state["version"] != CHECKPOINT_VERSION:
        raise ValueError(f"{str(checkpoint)!r} was written by the version-{state['version']} training loop, which drew "
                         "its noise differently: resuming would not continue that run. Train into a new checkpoint "
                         "path (load_checkpoint still reads the model)")
    return state


def _check_modules(state: dict, modules: Dict[str, nn.Module], path) -> None:
    """Refuses a checkpoint whose other modules are not this run's: a fine-tuning run resuming a frozen run's file
    or the reverse, or modules of other shapes (a trunk of more blocks)."""
    stored = state["modules"]
    if set(stored) != set(modules):
        raise ValueError(f"checkpoint {str(path)!r} was trained with the modules {sorted(stored) or 'none'} beside the "
                         f"layer, this run with {sorted(modules) or 'none'} (a fine-tuning run and a `train` run need "
                         "their own checkpoint paths); resume with the same options, or train into a new path")
    for name, module in modules.items():
        mine = {key: tuple(value.shape) for key, value in module.state_dict().items()}
        theirs = {key: tuple(value.shape) for key, value in stored[name].items()}
        if mine != theirs:
            differing = sorted(key for key in set(mine) | set(theirs) if mine.get(key) != theirs.get(key))
            raise ValueError(f"checkpoint {str(path)!r} holds a {name} of another shape (differs in {differing[:4]}"
                             f"{', …' if len(differing) > 4 else ''}); resume with the same options, or train into "
                             "a new checkpoint path")


def _check_writable_folder(path) -> None:
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise ValueError(f"cannot write checkpoint {str(path)!r} into folder {str(folder)!r} "
                         f"({error.strerror or error}); choose a path in a folder you can write") from error


def check_counts(iterations: int, batch_size: int, checkpoint_every: int, checkpoint) -> None:
    if iterations < 0 or batch_size < 1 or (checkpoint is not None and checkpoint_every < 1):
        raise ValueError(f"iterations must be ≥ 0, batch_size and (with a checkpoint) checkpoint_every ≥ 1; got "
                         f"{iterations}, {batch_size} and {checkpoint_every}")
