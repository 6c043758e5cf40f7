"""Algorithm 1: the training loop of the FV-VAE layer — AdaDelta over batches of sets, progress, periodic
checkpoints, on one process or data-parallel on several (torchrun)."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fvkernels.common import collectives
from fvkernels.nn import FVVAE
from fvkernels.training.checkpoint import check_counts, resume_state, save_checkpoint
from fvkernels.training.data import SetData


class _Objective(nn.Module):
    """The layer's losses as a forward pass, the form DistributedDataParallel wraps."""

    def __init__(self, layer: FVVAE) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, acts, labels, lengths, noise_seeds) -> Dict[str, Tensor]:
        return self.layer.loss(acts, labels, lengths, noise_seeds=noise_seeds)


def train(model: FVVAE, data: SetData, *, iterations: int = 5000, batch_size: int = 128, lr: float = 1.0,
          seed: int = 0, device=None, checkpoint=None, checkpoint_every: int = 500, progress: bool = True,
          distributed: bool = False, input_spec: Optional[dict] = None,
          data_fingerprint: Optional[str] = None) -> List[Dict[str, float]]:
    """Algorithm 1: `iterations` AdaDelta steps on random batches of `batch_size` sets.

    Deterministic given `seed`: batch order comes from a seeded generator and each set's dropout and ε
    from a seed of its own (step, position in the batch); the caller's global RNG is left as it was.
    With `checkpoint` (a path) the state is saved atomically every `checkpoint_every` steps and at the
    end, and a run that finds a compatible checkpoint there resumes from it, giving the same result as
    an uninterrupted run. input_spec is stored in the checkpoint and must match on resume, and so must
    data_fingerprint, which identifies the data (default: data.fingerprint()).

    distributed: this is one process of a torch.distributed job (fvkernels.app.distributed.init_from_env());
    every process calls train with the same data and arguments and takes its share of each global
    batch (positions rank, rank + K, … of K processes) under DistributedDataParallel, which averages the
    gradients: a step equals the single-process step on the same global batch, up to rounding. The σx
    floor comes from the whole first batch; process 0 writes the checkpoint and every process resumes
    from its copy. Returns the loss history (one dict of floats per step, means over the global batch).
    """
    check_counts(iterations, batch_size, checkpoint_every, checkpoint)
    if model.classifier is not None and data.labels is not None:  # once here: loss() checks ranges on CPU only
        model._check_labels(data.labels.cpu(), len(data))
    device = torch.device(device) if device is not None else data.acts.device
    model.to(device).train()
    rank, processes = collectives.rank_and_size(distributed)
    global_batch = min(batch_size, len(data))
    if global_batch % processes:
        raise ValueError(f"a batch of {global_batch} sets does not split evenly over {processes} processes; "
                         f"choose a batch size that is a multiple of {processes}")
    optimizer = torch.optim.Adadelta(model.parameters(), lr=lr)
    start, history = 0, []
    if checkpoint is not None and data_fingerprint is None:  # only a checkpoint records and checks it
        data_fingerprint = data.fingerprint()
    options = dict(seed=seed, batch_size=global_batch, lr=lr, num_sets=len(data), data_fingerprint=data_fingerprint)
    state = collectives.on_main(lambda: resume_state(checkpoint, model, input_spec, options, iterations), distributed)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["iteration"], list(state["history"])
    objective = _Objective(model)
    if distributed:
        unused = model.classifier is not None and data.labels is None  # no labels: the classifier gets no gradient
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=unused)
    order = _batches(len(data), global_batch, torch.Generator().manual_seed(seed))
    for _ in range(start):  # replaying the order is cheaper than storing the iterator's position
        next(order)
    share = slice(rank, None, processes)
    with tqdm(total=iterations, initial=start, desc="FV-VAE training", disable=not progress or rank != 0) as bar:
        for iteration in range(start, iterations):
            acts, labels, lengths = data.batch(next(order)[share], device)
            if not model.has_sigma_floor:
                model.init_sigma_floor(acts, lengths, distributed=distributed)
            noise_seeds = torch.randint(2 ** 62, (global_batch,),
                                        generator=torch.Generator().manual_seed(seed * 1_000_003 + iteration))
            losses = objective(acts, labels, lengths, noise_seeds[share].tolist())
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            means = collectives.sum_over_processes(torch.stack([value.detach().double() for value in losses.values()]),
                                                  distributed) / processes
            history.append(dict(zip(losses, means.tolist())))
            bar.set_postfix(total=f"{history[-1]['total']:.4g}", cls=f"{history[-1]['cls']:.3f}")
            bar.update()
            done = iteration + 1
            if checkpoint is not None and rank == 0 and (done % checkpoint_every == 0 or done == iterations):
                save_checkpoint(checkpoint, model, optimizer, done, history, input_spec, options)
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
