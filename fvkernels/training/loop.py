"""Algorithm 1: the training loop of the FV-VAE layer — AdaDelta over batches of sets, progress, periodic
checkpoints, on one process or data-parallel on several (torchrun)."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fvkernels.common import collectives
from fvkernels.common.checks import MAX_NAMED_INDICES, NonFiniteError, all_finite, check_finite
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
    check_finite(data.acts, lambda sets: f"the training data's acts hold NaN or Inf in "
                 f"{'some sets' if sets is None else f'sets {sets} (indices into the data)'}; clean or drop them")
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
    saved = start
    with tqdm(total=iterations, initial=start, desc="FV-VAE training", disable=not progress or rank != 0) as bar:
        for iteration in range(start, iterations):
            indices = next(order)[share]
            acts, labels, lengths = data.batch(indices, device)
            if not model.has_sigma_floor:
                model.init_sigma_floor(acts, lengths, distributed=distributed)
            noise_seeds = torch.randint(2 ** 62, (global_batch,),
                                        generator=torch.Generator().manual_seed(seed * 1_000_003 + iteration))[share]
            step = _Step(iteration + 1, iterations, indices, checkpoint, saved, lr)
            try:
                losses = objective(acts, labels, lengths, noise_seeds.tolist())
            except NonFiniteError as error:  # the parameters went non-finite in the previous step's update
                raise step.diverged(f"the update of step {iteration} made the parameters diverge: {error.finding}") \
                    from None
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            # One read per step, for the history and the check: the first non-finite loss or gradient stops the run
            # before the optimizer applies it and before any checkpoint is written.
            values = torch.stack([value.detach().double() for value in losses.values()] + [_gradient_sum(model)])
            values = collectives.sum_over_processes(values, distributed).tolist()
            means = dict(zip(losses, [value / processes for value in values[:-1]]))
            if not all(map(math.isfinite, values)):
                raise step.diverged(step.describe_losses(means), step.nonfinite_sets(model, acts, labels, lengths,
                                                                                     noise_seeds))
            optimizer.step()
            history.append(means)
            bar.set_postfix(total=f"{means['total']:.4g}", cls=f"{means['cls']:.3f}")
            bar.update()
            done = iteration + 1
            if checkpoint is not None and (done % checkpoint_every == 0 or done == iterations):
                # Every process checks (the parameters are the same everywhere), so that all stop together when
                # the last update overflowed; save_checkpoint refuses non-finite weights in any case.
                if not all_finite(list(model.parameters())):
                    raise step.diverged(f"the update of step {done} made the parameters non-finite")
                if rank == 0:
                    save_checkpoint(checkpoint, model, optimizer, done, history, input_spec, options)
                saved = done
    model.eval()
    return history


def _gradient_sum(model: nn.Module) -> Tensor:
    """Σ of every gradient entry, float64: finite iff every gradient is (or, rarely, a sum that overflows, which
    the culprit search then clears), at the cost of one reduction per parameter and no read."""
    sums = [parameter.grad.sum(dtype=torch.float64) for parameter in model.parameters() if parameter.grad is not None]
    return torch.stack(sums).sum() if sums else torch.zeros((), dtype=torch.float64)


class _Step:
    """What a failed step says: its number, the sets by their index in the training data, the last checkpoint."""

    def __init__(self, number: int, iterations: int, indices: Tensor, checkpoint, saved: int, lr: float) -> None:
        self.number, self.iterations, self.indices = number, iterations, indices
        self.checkpoint, self.saved, self.lr = checkpoint, saved, lr

    def describe_losses(self, means: Dict[str, float]) -> str:
        bad = [f"{name} = {value}" for name, value in means.items() if not math.isfinite(value)]
        if bad:
            return "the loss is not finite (" + ", ".join(bad) + ")"
        return "the loss is finite but its gradient is not"

    def nonfinite_sets(self, model: FVVAE, acts, labels, lengths, noise_seeds: Tensor) -> List[int]:
        """The sets of this process's share (by index in the data) whose own loss or gradient is not finite: each
        set's dropout and noise come from its own seed, so alone it reproduces its part of the batch."""
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        bad = []
        for position in range(len(self.indices)):
            one = slice(position, position + 1)
            try:
                total = model.loss(acts[one], None if labels is None else labels[one],
                                   None if lengths is None else lengths[one],
                                   noise_seeds=noise_seeds[one].tolist())["total"]
                gradients = torch.autograd.grad(total, parameters, allow_unused=True)
                finite = math.isfinite(float(total.detach())) and all_finite([g for g in gradients if g is not None])
            except NonFiniteError:
                finite = False
            if not finite:
                bad.append(int(self.indices[position]))
        return bad

    def diverged(self, what: str, sets: Optional[List[int]] = None) -> NonFiniteError:
        if sets is None:
            where = ""
        elif not sets:
            where = "; no set alone gives it (the sum over the batch overflowed)"
        else:
            named = ", ".join(map(str, sets[:MAX_NAMED_INDICES])) + (", …" if len(sets) > MAX_NAMED_INDICES else "")
            every = " — every set of the batch: the parameters diverged" if len(sets) == len(self.indices) else ""
            where = (f", on {len(sets)} of the batch's {len(self.indices)} sets: {named} (indices into the training "
                     f"data){every}")
        kept = (f"; {str(self.checkpoint)!r} still holds step {self.saved}, untouched" if self.checkpoint is not None
                and self.saved else "; no checkpoint was written" if self.checkpoint is not None else "")
        check = ", or check the sets named" if sets else ""
        return NonFiniteError(f"training stopped at step {self.number} of {self.iterations}: {what}{where}{kept}. "
                              f"Lower the learning rate (lr = {self.lr:g}){check}, then train again")


def _batches(num_sets: int, batch_size: int, generator: torch.Generator):
    """Endless batches of set indices: shuffled epochs, each set at most once per epoch."""
    if num_sets == 0:
        raise ValueError("no training sets")
    size = min(batch_size, num_sets)
    while True:
        permutation = torch.randperm(num_sets, generator=generator)
        for begin in range(0, num_sets - size + 1, size):
            yield permutation[begin: begin + size]
