"""Training the FV-VAE layer (Algorithm 1): AdaDelta, batches of sets, progress, atomic checkpoints, on one
process or data-parallel on several (torchrun)."""
from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fvkernels import distributed as dist_utils
from fvkernels.corpus import Backbone, Sample, activation_batches, check_root, digest_corpus
from fvkernels.nn import FVVAE
from fvkernels.video import check_frames_per_video

CHECKPOINT_FORMAT = "fvkernels.FVVAE"
# Version 2 added `input_spec` and draws each set's training noise from its own seed; a version-1 file
# still loads as a model, but resuming its training would not continue the run it came from.
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class SetData:
    """Training sets held in memory: acts (N, C, H, W) or (N, T, C), labels (N,) or None, lengths (N,) or None."""

    acts: Tensor
    labels: Optional[Tensor] = None
    lengths: Optional[Tensor] = None

    def __post_init__(self) -> None:
        for name in ("acts", "labels", "lengths"):  # numpy arrays and lists welcome
            value = getattr(self, name)
            if value is not None and not isinstance(value, Tensor):
                setattr(self, name, torch.as_tensor(value))
        for name in ("labels", "lengths"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 1 or len(value) != len(self.acts)):
                raise ValueError(f"{name} must have shape (N,) = ({len(self.acts)},) to match acts "
                                 f"{tuple(self.acts.shape)}, got {tuple(value.shape)}")

    def __len__(self) -> int:
        return len(self.acts)

    def fingerprint(self, values: int = 1 << 16) -> str:
        """sha256 of the shapes, dtypes, labels and lengths, and of `values` activations evenly spaced over
        all of them: reading a sample instead of every value keeps it instant for GBs of activations."""
        digest = hashlib.sha256(f"{tuple(self.acts.shape)} {self.acts.dtype}\n".encode())
        count = min(values, self.acts.numel())
        positions = torch.linspace(0, self.acts.numel() - 1, count, dtype=torch.float64).round().long()
        sampled = self.acts[torch.unravel_index(positions.to(self.acts.device), self.acts.shape)]
        for tensor in (sampled, self.labels, self.lengths):
            if tensor is None:
                digest.update(b"none\n")
                continue
            digest.update(f"{tensor.dtype}\n".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def batch(self, indices: Tensor, device) -> tuple:
        def take(t):
            return None if t is None else t[indices].to(device, non_blocking=True)
        return take(self.acts), take(self.labels), take(self.lengths)


# ---- checkpoints -----------------------------------------------------------------------------------------

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


def save_checkpoint(path, model: FVVAE, optimizer: Optional[torch.optim.Optimizer] = None, iteration: int = 0,
                    history: Sequence[dict] = (), input_spec: Optional[dict] = None,
                    training: Optional[dict] = None) -> None:
    """input_spec: what turns raw data into the layer's input (the `fvkernels train` command stores its
    backbone, layer, image size and weights digest), checked again on resume and by `fvkernels extract`.
    training: the run's options that decide its result (seed, batch size, lr, number of sets, data
    fingerprint), checked on resume so that a changed command line does not silently continue another run."""
    atomic_save({
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": dict(model.config),
        "model": model.state_dict(), "optimizer": None if optimizer is None else optimizer.state_dict(),
        "iteration": iteration, "history": list(history), "input_spec": input_spec, "training": training,
    }, path)


def read_checkpoint(path) -> dict:
    """Loads and checks a checkpoint's format and version (errors say what is wrong with the file)."""
    written_by = "written by `fvkernels train` / fvkernels.train.train"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}") from None
    except IsADirectoryError:
        raise ValueError(f"{str(path)!r} is a folder, not an fvkernels checkpoint ({written_by})") from None
    except OSError:
        raise  # permissions, I/O: the file may well be a checkpoint, and the error says what went wrong
    except Exception as error:  # torch.load explains in paragraphs why a file does not unpickle; its type is enough
        raise ValueError(f"{str(path)!r} is not an fvkernels checkpoint ({written_by}): torch.load cannot read it "
                         f"({type(error).__name__})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not an fvkernels FVVAE checkpoint (format {state.get('format')!r} "
                         f"if a dict, expected {CHECKPOINT_FORMAT!r})" if isinstance(state, dict) else
                         f"{str(path)!r} is not an fvkernels FVVAE checkpoint")
    if state.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{str(path)!r} has checkpoint version {state.get('version')!r}; this fvkernels reads "
                         f"version {' or '.join(map(str, READABLE_VERSIONS))} — load it with the fvkernels release "
                         "that wrote it")
    state.setdefault("input_spec", None)
    return state


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


def _resume_state(checkpoint, model: FVVAE, input_spec: Optional[dict], training: dict,
                  iterations: int) -> Optional[dict]:
    """The checkpoint to resume from, checked against the model and the run's options (those of `training`
    given: train_on_corpus checks some before it computes the sets); None when there is none yet. Also
    checks that the checkpoint can be written, so that a bad path fails before training, not after."""
    if checkpoint is None:
        return None
    _check_writable_folder(checkpoint)
    if not Path(checkpoint).exists():
        return None
    state = read_checkpoint(checkpoint)
    check_compatible(state, model, checkpoint, input_spec)
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


def _check_writable_folder(path) -> None:
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise ValueError(f"cannot write checkpoint {str(path)!r} into folder {str(folder)!r} "
                         f"({error.strerror or error}); choose a path in a folder you can write") from error


def _check_counts(iterations: int, batch_size: int, checkpoint_every: int, checkpoint) -> None:
    if iterations < 0 or batch_size < 1 or (checkpoint is not None and checkpoint_every < 1):
        raise ValueError(f"iterations must be ≥ 0, batch_size and (with a checkpoint) checkpoint_every ≥ 1; got "
                         f"{iterations}, {batch_size} and {checkpoint_every}")


# ---- training --------------------------------------------------------------------------------------------

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

    distributed: this is one process of a torch.distributed job (fvkernels.distributed.init_from_env());
    every process calls train with the same data and arguments and takes its share of each global
    batch (positions rank, rank + K, … of K processes) under DistributedDataParallel, which averages the
    gradients: a step equals the single-process step on the same global batch, up to rounding. The σx
    floor comes from the whole first batch; process 0 writes the checkpoint and every process resumes
    from its copy. Returns the loss history (one dict of floats per step, means over the global batch).
    """
    _check_counts(iterations, batch_size, checkpoint_every, checkpoint)
    if model.classifier is not None and data.labels is not None:  # once here: loss() checks ranges on CPU only
        model._check_labels(data.labels.cpu(), len(data))
    device = torch.device(device) if device is not None else data.acts.device
    model.to(device).train()
    rank, processes = dist_utils.rank_and_size(distributed)
    global_batch = min(batch_size, len(data))
    if global_batch % processes:
        raise ValueError(f"a batch of {global_batch} sets does not split evenly over {processes} processes; "
                         f"choose a batch size that is a multiple of {processes}")
    optimizer = torch.optim.Adadelta(model.parameters(), lr=lr)
    start, history = 0, []
    if checkpoint is not None and data_fingerprint is None:  # only a checkpoint records and checks it
        data_fingerprint = data.fingerprint()
    options = dict(seed=seed, batch_size=global_batch, lr=lr, num_sets=len(data), data_fingerprint=data_fingerprint)
    state = dist_utils.on_main(lambda: _resume_state(checkpoint, model, input_spec, options, iterations), distributed)
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
            if float(model.sigma_x_min) == 0:
                model.init_sigma_floor(acts, lengths, distributed=distributed)
            noise_seeds = torch.randint(2 ** 62, (global_batch,),
                                        generator=torch.Generator().manual_seed(seed * 1_000_003 + iteration))
            losses = objective(acts, labels, lengths, noise_seeds[share].tolist())
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            means = dist_utils.sum_over_processes(torch.stack([value.detach().double() for value in losses.values()]),
                                                  distributed) / processes
            history.append(dict(zip(losses, means.tolist())))
            bar.set_postfix(total=f"{history[-1]['total']:.4g}", cls=f"{history[-1]['cls']:.3f}")
            bar.update()
            done = iteration + 1
            if checkpoint is not None and rank == 0 and (done % checkpoint_every == 0 or done == iterations):
                save_checkpoint(checkpoint, model, optimizer, done, history, input_spec, options)
    model.eval()
    return history


def train_on_corpus(samples: Sequence[Sample], root, backbone: Backbone, checkpoint, *,
                    layer_options: Optional[dict] = None, frames_per_video: Optional[int] = None, image_batch: int = 32,
                    strict: bool = False, distributed: bool = False, device=None, progress: bool = True,
                    **training) -> FVVAE:
    """`fvkernels train`: trains an FVVAE layer (options `layer_options`) on the backbone's activations of
    `samples` under `root` — each image, or each sampled frame of a video, one set with its sample's
    label — then fits its Fisher on the same sets. The checkpoint holds both and the backbone's spec.
    `training` goes to `train` (iterations, batch_size, lr, seed, checkpoint_every).

    distributed: each process computes the activations of a contiguous share of the samples; the shares
    are gathered (every global batch draws from all sets), and each process fits the Fisher on its own.
    The result does not depend on the number of processes, up to rounding.
    """
    # train's options with its defaults filled in: some are checked before the long part, the activations
    options = {name: parameter.default for name, parameter in inspect.signature(train).parameters.items()
               if parameter.kind is parameter.KEYWORD_ONLY} | training
    _check_counts(options["iterations"], options["batch_size"], options["checkpoint_every"], checkpoint)
    check_frames_per_video(frames_per_video)
    if image_batch < 1:
        raise ValueError(f"image_batch must be positive, got {image_batch}")
    rank, processes = dist_utils.rank_and_size(distributed)
    device = torch.device(device) if device is not None else dist_utils.default_device(distributed)
    backbone.to(device)
    with torch.no_grad():  # the maps' shape, known before any image is read, sizes the layer
        no_maps = backbone.features(torch.zeros(1, 3, backbone.image_size, backbone.image_size, device=device))[:0]
    labelled = samples[0].label is not None
    layer_options = dict(layer_options or {})
    if labelled and layer_options.get("lambda_cls", None) != 0:
        layer_options["num_classes"] = max(sample.label for sample in samples) + 1
    with torch.random.fork_rng(devices=[]):  # the same initial layer in every process and every run
        torch.manual_seed(options["seed"])
        model = FVVAE(no_maps.shape[1], **layer_options)
    data_fingerprint = digest_corpus(samples, frames_per_video)

    def check_root_and_checkpoint():
        check_root(root)
        _resume_state(checkpoint, model, backbone.spec, dict(seed=options["seed"], lr=options["lr"],
                                                             data_fingerprint=data_fingerprint), options["iterations"])

    dist_utils.on_main(check_root_and_checkpoint, distributed)

    share = samples[rank * len(samples) // processes: (rank + 1) * len(samples) // processes]
    owners, maps = [torch.zeros(0, dtype=torch.int64)], [no_maps]  # no_maps: a share without readable images
    for batch_owners, batch_maps in activation_batches(share, root, backbone, frames_per_video=frames_per_video,
                                                       batch_size=image_batch, strict=strict, device=device,
                                                       progress=progress and rank == 0):
        owners.append(batch_owners)
        maps.append(batch_maps)
    local_acts = torch.cat(maps)
    local_labels = torch.tensor([share[owner].label for owner in torch.cat(owners).tolist()], dtype=torch.int64,
                                device=device) if labelled else None
    data = SetData(dist_utils.gather_rows(local_acts, distributed),
                   dist_utils.gather_rows(local_labels, distributed) if labelled else None)
    if len(data) == 0:
        raise ValueError(f"none of the {len(samples)} samples had a readable image; check the list and --root")

    train(model, data, checkpoint=checkpoint, distributed=distributed, input_spec=backbone.spec, device=device,
          progress=progress, data_fingerprint=data_fingerprint, **training)
    model.fit_fisher(local_acts.split(256), distributed=distributed)

    def store_fisher():
        state = read_checkpoint(checkpoint)
        state["model"] = model.state_dict()
        atomic_save(state, checkpoint)

    dist_utils.on_main(store_fisher, distributed)  # a failure reaches every process, none waits for process 0
    return model


def _batches(num_sets: int, batch_size: int, generator: torch.Generator):
    """Endless batches of set indices: shuffled epochs, each set at most once per epoch."""
    if num_sets == 0:
        raise ValueError("no training sets")
    size = min(batch_size, num_sets)
    while True:
        permutation = torch.randperm(num_sets, generator=generator)
        for begin in range(0, num_sets - size + 1, size):
            yield permutation[begin: begin + size]
