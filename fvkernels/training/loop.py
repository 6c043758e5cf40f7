"""Algorithm 1: the training loop of the FV-VAE layer — AdaDelta over batches of sets, progress, periodic
checkpoints, on one process or data-parallel on several (torchrun) — and its end-to-end form, which fine-tunes a
backbone's top blocks with the layer."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fvkernels.common import collectives
from fvkernels.common.checks import MAX_NAMED_INDICES, NonFiniteError, all_finite, check_finite, real_number
from fvkernels.nn import FVVAE
from fvkernels.training.checkpoint import check_counts, resume_state, save_checkpoint
from fvkernels.training.data import SetData

TRUNK_LOSSES = ("discriminative", "all")


class _Objective(nn.Module):
    """The losses of a step as a forward pass, the form DistributedDataParallel wraps: Algorithm 1's on the layer's
    input, which fine-tuning computes with a trainable trunk, and, with a classifier on the normalised Fisher vectors,
    its cross-entropy weighted by lambda_fv ("fv_cls").

    trunk_losses="discriminative": the generative terms (rec, reg) train the layer on the trunk's output as data,
    detached, and only the classification terms reach the trunk. Their gradient would otherwise reshape the features
    to be easy to reconstruct (the likelihood of the data rises by changing the data), which lost accuracy in the
    demo's measurement; "all" backpropagates every term. The classification term then needs a second pass of the
    layer on the attached maps, with the same per-set noise."""

    def __init__(self, layer: FVVAE, trunk: Optional[nn.Module], fv_classifier: Optional[nn.Module],
                 lambda_fv: float, trunk_losses: str) -> None:
        super().__init__()
        self.layer, self.trunk, self.fv_classifier, self.lambda_fv = layer, trunk, fv_classifier, lambda_fv
        self.trunk_losses = trunk_losses

    def layer_input(self, inputs: Tensor) -> Tensor:
        return inputs if self.trunk is None else self.trunk(inputs)

    def forward(self, inputs, labels, lengths, noise_seeds) -> Dict[str, Tensor]:
        acts = self.layer_input(inputs)
        if self.trunk is None or self.trunk_losses == "all":
            losses = self.layer.loss(acts, labels, lengths, noise_seeds=noise_seeds)
        else:
            losses = self.layer.loss(acts.detach(), None, lengths, noise_seeds=noise_seeds)
            if self.layer.classifier is not None and labels is not None:
                losses["cls"] = self.layer.loss(acts, labels, lengths, noise_seeds=noise_seeds)["cls"]
                losses["total"] = losses["total"] + self.layer.lambda_cls * losses["cls"]
        if self.fv_classifier is not None:
            scores = self.fv_classifier(self.layer(acts, lengths))
            fv_cls = F.cross_entropy(scores, labels.to(scores.device)) if len(scores) else scores.sum()
            total = losses.pop("total")
            losses.update(fv_cls=fv_cls, total=total + self.lambda_fv * fv_cls)
        return losses


def train(model: FVVAE, data: SetData, *, iterations: int = 5000, batch_size: int = 128, lr: float = 1.0,
          seed: int = 0, device=None, checkpoint=None, checkpoint_every: int = 500, progress: bool = True,
          distributed: bool = False, input_spec: Optional[dict] = None, data_fingerprint: Optional[str] = None,
          trunk: Optional[nn.Module] = None, trunk_lr: Optional[float] = None, trunk_losses: str = "discriminative",
          fv_classifier: Optional[nn.Module] = None, lambda_fv: float = 1.0) -> List[Dict[str, float]]:
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

    End-to-end fine-tuning (the paper's "w ft"): with `trunk`, data.acts are the trunk's inputs (e.g. the maps
    of a backbone's frozen lower blocks) and the layer encodes trunk(acts); Algorithm 1's losses train the trunk's
    parameters that require grad together with the layer, at learning rate trunk_lr (default lr). The trunk runs
    in eval mode: its batch-norm statistics stay those it was pretrained with (a batch of one task's sets would
    re-estimate them). fv_classifier (e.g. nn.Linear(model.output_dim, classes)) adds the cross-entropy of its
    scores of the normalised Fisher vectors, weighted by lambda_fv; it needs labels. trunk_losses: which terms reach
    the trunk — "discriminative" (default: the classification losses; the generative ones train the layer on the
    trunk's output as data) or "all" (every term of Algorithm 1, which can trade the features' information for an
    easier reconstruction). The checkpoint stores the
    trunk and the classifier beside the layer, and resumes them. Refit the Fisher afterwards (fit_fisher on the
    trunk's outputs): the vectors it was fitted on have changed.
    """
    check_counts(iterations, batch_size, checkpoint_every, checkpoint)
    if model.classifier is not None and data.labels is not None:  # once here: loss() checks ranges on CPU only
        model._check_labels(data.labels.cpu(), len(data))
    lambda_fv = check_fine_tuning(model, trunk, trunk_lr, trunk_losses, fv_classifier, lambda_fv, data.labels)
    check_finite(data.acts, lambda sets: f"the training data's acts hold NaN or Inf in "
                 f"{'some sets' if sets is None else f'sets {sets} (indices into the data)'}; clean or drop them")
    device = torch.device(device) if device is not None else data.acts.device
    model.to(device).train()
    trunk_modes = {} if trunk is None else {module: module.training for module in trunk.modules()}
    if trunk is not None:
        trunk.to(device).eval()
    if fv_classifier is not None:
        fv_classifier.to(device).train()
    rank, processes = collectives.rank_and_size(distributed)
    global_batch = min(batch_size, len(data))
    if global_batch % processes:
        raise ValueError(f"a batch of {global_batch} sets does not split evenly over {processes} processes; "
                         f"choose a batch size that is a multiple of {processes}")
    steps = _Objective(model, trunk, fv_classifier, lambda_fv, trunk_losses)
    modules = {name: module for name, module in (("trunk", trunk), ("fv_classifier", fv_classifier))
               if module is not None}
    groups = [{"params": [*model.parameters(), *(fv_classifier.parameters() if fv_classifier else ())], "lr": lr}]
    if trunk is not None:
        groups.append({"params": [p for p in trunk.parameters() if p.requires_grad],
                       "lr": lr if trunk_lr is None else trunk_lr})
    optimizer = torch.optim.Adadelta(groups, lr=lr)
    start, history = 0, []
    if checkpoint is not None and data_fingerprint is None:  # only a checkpoint records and checks it
        data_fingerprint = data.fingerprint()
    options = dict(seed=seed, batch_size=global_batch, lr=lr, num_sets=len(data), data_fingerprint=data_fingerprint)
    if modules:  # a frozen run's options stay as they were, so that its checkpoints still resume
        options.update(trunk_lr=groups[-1]["lr"] if trunk is not None else None, lambda_fv=lambda_fv if
                       fv_classifier is not None else None, trunk_losses=trunk_losses if trunk is not None else None)
    state = collectives.on_main(lambda: resume_state(checkpoint, model, input_spec, options, iterations, modules),
                                distributed)
    if state is not None:
        model.load_state_dict(state["model"])
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["iteration"], list(state["history"])
    objective = steps
    if distributed:
        unused = model.classifier is not None and data.labels is None  # no labels: the classifier gets no gradient
        objective = nn.parallel.DistributedDataParallel(
            steps, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=unused)
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
                with torch.no_grad():
                    model.init_sigma_floor(steps.layer_input(acts), lengths, distributed=distributed)
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
            values = torch.stack([value.detach().double() for value in losses.values()] + [_gradient_sum(steps)])
            values = collectives.sum_over_processes(values, distributed).tolist()
            means = dict(zip(losses, [value / processes for value in values[:-1]]))
            if not all(map(math.isfinite, values)):
                raise step.diverged(step.describe_losses(means), step.nonfinite_sets(steps, acts, labels, lengths,
                                                                                     noise_seeds))
            optimizer.step()
            history.append(means)
            bar.set_postfix(total=f"{means['total']:.4g}", cls=f"{means['cls']:.3f}")
            bar.update()
            done = iteration + 1
            if checkpoint is not None and (done % checkpoint_every == 0 or done == iterations):
                # Every process checks (the parameters are the same everywhere), so that all stop together when
                # the last update overflowed; save_checkpoint refuses non-finite weights in any case.
                if not all_finite(list(steps.parameters())):
                    raise step.diverged(f"the update of step {done} made the parameters non-finite")
                if rank == 0:
                    save_checkpoint(checkpoint, model, optimizer, done, history, input_spec, options, modules)
                saved = done
    model.eval()
    if fv_classifier is not None:
        fv_classifier.eval()
    for module, training in trunk_modes.items():  # as the caller had them (the trunk may be part of their model)
        module.training = training
    return history


def check_fine_tuning(model: FVVAE, trunk, trunk_lr, trunk_losses: str, fv_classifier, lambda_fv,
                      labels: Optional[Tensor]) -> float:
    """train's fine-tuning options, checked before any work (`fvkernels finetune` calls it before the corpus's
    activations): a classifier on the Fisher vectors needs labels within its outputs, a trunk trained by the
    classification losses alone needs one of them with a weight > 0, and the weights and rates are finite numbers
    ≥ 0. Returns lambda_fv as a float."""
    if trunk is not None and not isinstance(trunk, nn.Module):
        raise TypeError(f"trunk must be an nn.Module mapping data.acts to the layer's input, got "
                        f"{type(trunk).__name__}")
    if trunk_lr is not None:
        real_number("trunk_lr", trunk_lr, minimum=0)
    lambda_fv = real_number("lambda_fv", lambda_fv, minimum=0)
    if trunk_losses not in TRUNK_LOSSES:
        raise ValueError(f"trunk_losses must be one of {', '.join(map(repr, TRUNK_LOSSES))}, got {trunk_losses!r}")
    if fv_classifier is not None:
        if labels is None:
            raise ValueError("fv_classifier needs labels to train on; give the SetData labels, or leave fv_classifier "
                             "out")
        classes = getattr(fv_classifier, "out_features", None)
        if classes is not None and len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < classes:
            raise ValueError(f"labels must lie in [0, {classes - 1}] for fv_classifier's {classes} outputs, got "
                             f"values from {int(labels.min())} to {int(labels.max())}")
    classifying = labels is not None and ((fv_classifier is not None and lambda_fv > 0) or
                                          (model.classifier is not None and model.lambda_cls > 0))
    if trunk is not None and trunk_losses == "discriminative" and not classifying:
        raise ValueError("trunk_losses='discriminative' trains the trunk by the classification losses, and this run "
                         "has none (it needs labels, and the layer's λ3 > 0 or an fv_classifier with lambda_fv > 0); "
                         "pass labels and an fv_classifier (`fvkernels finetune`: a labelled list and --lambda-fv > "
                         "0), or trunk_losses='all' (--trunk-losses all)")
    return lambda_fv


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

    def nonfinite_sets(self, objective: _Objective, acts, labels, lengths, noise_seeds: Tensor) -> List[int]:
        """The sets of this process's share (by index in the data) whose own loss or gradient is not finite: each
        set's dropout and noise come from its own seed, so alone it reproduces its part of the batch."""
        parameters = [parameter for parameter in objective.parameters() if parameter.requires_grad]
        bad = []
        for position in range(len(self.indices)):
            one = slice(position, position + 1)
            try:
                total = objective(acts[one], None if labels is None else labels[one],
                                  None if lengths is None else lengths[one], noise_seeds[one].tolist())["total"]
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
