"""Training the FV-VAE layer (Algorithm 1): AdaDelta, batches of sets, progress, atomic checkpoints."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fvkernels.nn import FVVAE

CHECKPOINT_FORMAT = "fvkernels.FVVAE"
CHECKPOINT_VERSION = 1


@dataclass
class SetData:
    """Training sets held in memory: acts (N, C, H, W) or (N, T, C), labels (N,) or None, lengths (N,) or None."""

    acts: Tensor
    labels: Optional[Tensor] = None
    lengths: Optional[Tensor] = None

    def __post_init__(self) -> None:
        for name in ("labels", "lengths"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 1 or len(value) != len(self.acts)):
                raise ValueError(f"{name} must have shape (N,) = ({len(self.acts)},) to match acts "
                                 f"{tuple(self.acts.shape)}, got {tuple(value.shape)}")

    def __len__(self) -> int:
        return len(self.acts)

    def batch(self, indices: Tensor, device) -> tuple:
        def take(t):
            return None if t is None else t[indices].to(device, non_blocking=True)
        return take(self.acts), take(self.labels), take(self.lengths)


# ---- checkpoints -----------------------------------------------------------------------------------------

def atomic_save(obj, path: Union[str, Path]) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash leaves either the
    old file or the new one, never a partial file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_checkpoint(path, model: FVVAE, optimizer: Optional[torch.optim.Optimizer] = None, iteration: int = 0,
                    history: Sequence[dict] = ()) -> None:
    atomic_save({
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": dict(model.config),
        "model": model.state_dict(), "optimizer": None if optimizer is None else optimizer.state_dict(),
        "iteration": iteration, "history": list(history),
    }, path)


def read_checkpoint(path) -> dict:
    """Loads and checks a checkpoint's format and version (errors say what is wrong with the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}") from None
    except Exception as error:
        raise ValueError(f"{str(path)!r} is not a readable fvkernels checkpoint ({error})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not an fvkernels FVVAE checkpoint (format {state.get('format')!r} "
                         f"if a dict, expected {CHECKPOINT_FORMAT!r})" if isinstance(state, dict) else
                         f"{str(path)!r} is not an fvkernels FVVAE checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint version {state.get('version')!r}; this fvkernels reads "
                         f"version {CHECKPOINT_VERSION} — load it with the fvkernels release that wrote it")
    return state


def check_compatible(state: dict, model: FVVAE, path) -> None:
    """Refuses a checkpoint written for another architecture or other options, naming what differs."""
    differences = [f"{key}: checkpoint {state['config'].get(key)!r}, model {value!r}"
                   for key, value in model.config.items() if state["config"].get(key) != value]
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


# ---- training --------------------------------------------------------------------------------------------

def train(model: FVVAE, data: SetData, *, iterations: int = 5000, batch_size: int = 128, lr: float = 1.0,
          seed: int = 0, device=None, checkpoint=None, checkpoint_every: int = 500, progress: bool = True,
          ) -> List[Dict[str, float]]:
    """Algorithm 1: `iterations` AdaDelta steps on random batches of `batch_size` sets.

    Deterministic given `seed`: batch order comes from a seeded generator and each step's dropout and ε
    draws from a per-step seed (the caller's global RNG is left as it was). With `checkpoint` (a path)
    the state is saved atomically every `checkpoint_every` steps and at the end, and a run that finds a
    compatible checkpoint there resumes from it, giving the same result as an uninterrupted run.
    Returns the loss history (one dict of floats per step).
    """
    device = torch.device(device) if device is not None else data.acts.device
    model.to(device).train()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=lr)
    start, history = 0, []
    if checkpoint is not None and Path(checkpoint).exists():
        state = read_checkpoint(checkpoint)
        check_compatible(state, model, checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["iteration"], list(state["history"])
    order = _batches(len(data), batch_size, torch.Generator().manual_seed(seed))
    for _ in range(start):  # replaying the order is cheaper than storing the iterator's position
        next(order)
    rng_devices = [device] if device.type == "cuda" else []
    with tqdm(total=iterations, initial=start, desc="FV-VAE training", disable=not progress) as bar:
        for iteration in range(start, iterations):
            acts, labels, lengths = data.batch(next(order), device)
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(seed * 1_000_003 + iteration)
                losses = model.loss(acts, labels, lengths)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            history.append({name: float(value.detach()) for name, value in losses.items()})
            bar.set_postfix(total=f"{history[-1]['total']:.4g}", cls=f"{history[-1]['cls']:.3f}")
            bar.update()
            done = iteration + 1
            if checkpoint is not None and (done % checkpoint_every == 0 or done == iterations):
                save_checkpoint(checkpoint, model, optimizer, done, history)
    model.eval()
    return history


def _batches(num_sets: int, batch_size: int, generator: torch.Generator):
    """Endless batches of set indices: shuffled epochs, each set at most once per epoch."""
    if num_sets == 0:
        raise ValueError("no training sets")
    size = min(batch_size, num_sets)
    while True:
        permutation = torch.randperm(num_sets, generator=generator)
        for begin in range(0, num_sets - size + 1, size):
            yield permutation[begin: begin + size]
