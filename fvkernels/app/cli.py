"""Command line: `python -m fvkernels demo | backends | selftest | train | finetune | extract` (also installed as the
`fvkernels` console script). `train`, `finetune` and `extract` also run as every process of a torchrun job:
`torchrun --standalone --nproc_per_node=K -m fvkernels train|finetune|extract ...`."""
from __future__ import annotations

import argparse
import ctypes
import functools
import sys
import time
from pathlib import Path

import torch

from fvkernels.app.arguments import (
    DefaultsHelpFormatter,
    efficientnet_layer,
    image_size,
    layer_help,
    non_negative_float,
    positive_int,
)
from fvkernels.common import extras
from fvkernels.common.collectives import rank_and_size
from fvkernels.ops import dispatch, verification
from fvkernels.pipeline import FVVAEParams, fv_vae_encode


def backend_demo(args) -> int:
    """Encodes random CNN-like activations with every available backend; prints agreement and speed."""
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    channels, latent, hidden = args.channels, args.latent, args.hidden
    encoder = [(torch.randn(hidden, channels) / channels ** 0.5, torch.zeros(hidden), True),
               (torch.randn(latent, hidden) / hidden ** 0.5, torch.zeros(latent), False)]
    params = FVVAEParams(encoder, torch.randn(channels, latent) / latent ** 0.5, torch.full((channels,), 0.01),
                         torch.ones(channels), torch.rand(channels, latent + 1) + 0.5, prenorm="descriptor")
    acts = torch.relu(torch.randn(args.batch, channels, args.size, args.size))  # post-ReLU conv maps
    print(f"fvkernels backends: {args.batch} maps of {channels}×{args.size}×{args.size} → "
          f"{params.dim}-d FV-VAE (encoder {channels}→{hidden}→{latent}), device {device}")
    print(f"available backends: {', '.join(dispatch.available_backends())}")
    expected = fv_vae_encode(acts.double(), params.to(torch.float64), backend="torch")
    print(f"{'backend':<8} {'max rel. error vs float64':>26} {'ms per map':>11}")
    for backend in dispatch.BACKENDS:
        if dispatch.unavailable_reason(backend, device) is not None:
            continue
        acts_d, params_d = acts.to(device), params.to(device)
        fv_vae_encode(acts_d, params_d, backend=backend)  # warm-up (JIT, autotune, thread pools)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            out = fv_vae_encode(acts_d, params_d, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / args.repeats
        signed_square = lambda v: v.double().cpu() * v.double().cpu().abs()  # noqa: E731 (√ amplifies ε near 0)
        error = float((signed_square(out) - signed_square(expected)).abs().max() / signed_square(expected).abs().max())
        print(f"{backend:<8} {error:>26.2e} {1e3 * elapsed / args.batch:>11.2f}")
    return 0


def run_selftest(args) -> int:
    """Every backend on every device and dtype against the float64 reference; status 1 when one fails."""
    results = verification.selftest()
    print(f"fvkernels selftest: every backend on every device of this machine, against the float64 reference "
          f"({len(verification.CHECK_SHAPES)} odd shapes, lengths with an empty set, every epilogue option)")
    print(f"{'backend':<8} {'device':<36} {'dtype':<9} {'max error':>10} {'row sums':>10} {'tolerance':>10} "
          f"{'time (s)':>9}  result")
    for result in results:
        print(f"{result.backend:<8} {result.device[:36]:<36} {result.dtype:<9} {result.error:>10.2e} "
              f"{result.row_sums_error:>10.2e} {result.tolerance:>10.1e} {result.seconds:>9.3f}  "
              f"{'pass' if result.passed else 'FAIL'}")
    failed = [result for result in results if not result.passed]
    print(f"{len(results) - len(failed)} of {len(results)} passed" + (
        "; backend='auto' does not use a GPU kernel that failed its check" if failed else ""))
    return 1 if failed else 0


def reporting_errors(run):
    """A command whose input errors (ValueError, OSError: bad list, mismatched checkpoint or output folder,
    unreadable input with --strict, a path that is missing, a folder or not writable) and missing extras end it
    with their message and status 2, not a traceback."""
    @functools.wraps(run)
    def wrapper(args) -> int:
        try:
            return run(args)
        except (ValueError, OSError, extras.MissingExtra) as error:
            print(f"fvkernels {args.command}: error: {error}", file=sys.stderr)
            return 2
    return wrapper


@reporting_errors
def run_demo(args) -> int:
    from fvkernels.app import demo

    return demo.run(args)


@reporting_errors
def run_train(args) -> int:
    from fvkernels.app import distributed
    from fvkernels.app.backbones import BACKBONES
    from fvkernels.app.corpus import read_sample_list
    from fvkernels.app.corpus_training import train_on_corpus

    extras.require("images", "fvkernels train")
    parallel = distributed.init_from_env()
    with distributed.leaving_at_exit(parallel):
        samples = read_sample_list(args.list)
        backbone = BACKBONES[args.backbone](args.layer, args.image_size)
        layer_options = dict(latent_dim=args.latent_dim, hidden=args.hidden, lambda_cls=args.lambda_cls)
        model = train_on_corpus(samples, args.root, backbone, args.checkpoint, layer_options=layer_options,
                                frames_per_video=args.frames_per_video, image_batch=args.image_batch,
                                strict=args.strict, distributed=parallel, iterations=args.iterations,
                                batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                checkpoint_every=args.checkpoint_every)
        if rank_and_size(parallel)[0] == 0:
            print(f"FV-VAE layer {model.in_channels} → {model.latent_dim} trained for {args.iterations} steps, Fisher "
                  f"from {int(model.fisher_sets)} sets: {args.checkpoint}")
    return 0


@reporting_errors
def run_finetune(args) -> int:
    from fvkernels.app import distributed
    from fvkernels.app.corpus import read_sample_list
    from fvkernels.app.corpus_training import finetune_on_corpus

    extras.require("images", "fvkernels finetune")
    parallel = distributed.init_from_env()
    with distributed.leaving_at_exit(parallel):
        model, _ = finetune_on_corpus(read_sample_list(args.list), args.root, args.init, args.checkpoint,
                                      trainable_blocks=args.trainable_blocks, trunk_lr=args.trunk_lr,
                                      trunk_losses=args.trunk_losses,
                                      lambda_fv=args.lambda_fv, frames_per_video=args.frames_per_video,
                                      image_batch=args.image_batch, strict=args.strict, distributed=parallel,
                                      iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                                      seed=args.seed, checkpoint_every=args.checkpoint_every)
        if rank_and_size(parallel)[0] == 0:
            print(f"FV-VAE layer {model.in_channels} → {model.latent_dim} fine-tuned with the backbone's last "
                  f"{args.trainable_blocks} blocks for {args.iterations} steps, Fisher refitted on "
                  f"{int(model.fisher_sets)} sets: {args.checkpoint}")
    return 0


@reporting_errors
def run_extract(args) -> int:
    from fvkernels.app import distributed
    from fvkernels.app.backbones import backbone_from_spec
    from fvkernels.app.corpus import read_sample_list
    from fvkernels.app.extract import extract
    from fvkernels.training import load_checkpoint, read_checkpoint

    extras.require("images", "fvkernels extract")
    parallel = distributed.init_from_env()
    with distributed.leaving_at_exit(parallel):
        state = read_checkpoint(args.model)
        input_spec = state["input_spec"]
        if not input_spec:
            raise ValueError(f"{args.model} does not say which backbone made its inputs (it was saved without an "
                             "input_spec); extract with fvkernels.app.extract.extract and your Backbone instead")
        model = load_checkpoint(args.model)
        if not model.has_fisher:
            raise ValueError(f"{args.model} has no fitted Fisher; let `fvkernels train` finish (rerun it to resume)")
        if "trainable_blocks" in input_spec and state.get("fisher_refitted_at") != state["iteration"]:
            raise ValueError(f"{args.model} is a fine-tuning run that has not finished (step {state['iteration']}, "
                             "its Fisher not yet refitted on the fine-tuned maps); rerun `fvkernels finetune` to "
                             "finish it")
        backbone = backbone_from_spec(input_spec, state["modules"])
        manifest = extract(read_sample_list(args.list), args.root, model, backbone, args.out,
                           dtype=args.dtype, shard_size=args.shard_size, batch_size=args.image_batch,
                           frames_per_video=args.frames_per_video, strict=args.strict, distributed=parallel)
        if rank_and_size(parallel)[0] == 0:
            counts = manifest["counts"]
            print(f"{counts['encoded']} of {counts['samples']} samples encoded into {len(manifest['shards'])} shards of "
                  f"{manifest['dim']}-d {manifest['dtype']} Fisher vectors in {args.out} ({counts['dropped']} dropped, "
                  f"{counts['unreadable_inputs']} unreadable inputs: see manifest.json)")
    return 0


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", required=True, type=Path,
                        help="list file (UTF-8), one sample per line, an image or a folder of frames: 'relative/path' "
                             "or 'relative/path<TAB>label' (label: a whole number ≥ 0 in ASCII digits; every line "
                             "labelled or none). The tab lets paths hold spaces; 'path label' with one space is also "
                             "read when the path has none, and any other line with spaces but no tab is refused")
    parser.add_argument("--root", required=True, type=Path, help="the folder the listed paths are relative to")
    parser.add_argument("--frames-per-video", type=positive_int, default=None,
                        help="frames taken evenly spaced from each frame folder; None: every frame")
    parser.add_argument("--image-batch", type=positive_int, default=32, help="images per backbone batch")
    parser.add_argument("--strict", action="store_true",
                        help="fail on an unreadable image or frame instead of reporting and skipping it")


def keep_freed_memory() -> None:
    """Let glibc keep freed blocks instead of returning each large one to the OS: training and encoding
    allocate and free tens of MB per step, and re-faulting those pages cost a quarter of the run time.
    Process-wide, so only this command line does it, never an import of the library."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    mmap_threshold, trim_threshold = -3, -1  # mallopt parameters M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    libc.mallopt(mmap_threshold, 1 << 30)
    libc.mallopt(trim_threshold, (1 << 31) - 1)


def main(argv=None) -> int:
    from fvkernels.app import demo as demo_module
    from fvkernels.app.backbones import BACKBONES
    from fvkernels.app.extract import DTYPES

    keep_freed_memory()
    formatter = DefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="fvkernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="FV-VAE vs classic encoders on Fashion-MNIST (table, plots)",
                               description=demo_module.__doc__, formatter_class=formatter)
    demo_module.add_arguments(demo)
    demo.set_defaults(run=run_demo)

    backends = commands.add_parser("backends", help="encode random activations with every backend (agreement, speed)",
                                   description="Encodes random post-ReLU maps with every available backend and "
                                               "prints each one's error against float64 and its time per map.",
                                   formatter_class=formatter)
    backends.add_argument("--batch", type=positive_int, default=16, help="maps per call")
    backends.add_argument("--channels", type=positive_int, default=512, help="channels C of the maps")
    backends.add_argument("--size", type=positive_int, default=14, help="spatial size H = W of the maps")
    backends.add_argument("--latent", type=positive_int, default=256, help="latent size d")
    backends.add_argument("--hidden", type=positive_int, default=512, help="width of the encoder's hidden layer")
    backends.add_argument("--repeats", type=positive_int, default=3, help="timed calls per backend")
    backends.add_argument("--seed", type=int, default=0, help="seed of the random maps and weights")
    backends.set_defaults(run=backend_demo)

    selftest = commands.add_parser(
        "selftest", help="check every backend on every device and dtype against the float64 reference",
        description=run_selftest.__doc__, formatter_class=formatter)
    selftest.set_defaults(run=run_selftest)

    train = commands.add_parser(
        "train", help="train an FV-VAE layer on a frozen CNN's activations of images/videos", formatter_class=formatter,
        description="Trains the FV-VAE layer (Algorithm 1) on the activations of a frozen backbone, fits its Fisher, "
                    "and writes a checkpoint; rerunning the same command resumes from it. The size and length "
                    "defaults are smaller than the library's (fvkernels.nn.FVVAE: the paper's d = 256, hidden 512; "
                    "fvkernels.training.train: 5000 steps, a checkpoint every 500): they are sized for a run of "
                    "minutes on a few CPU cores; pass the paper's values for a GPU-sized run.")
    add_corpus_arguments(train)
    train.add_argument("--checkpoint", required=True, type=Path, help="checkpoint to write, and to resume from")
    train.add_argument("--backbone", choices=sorted(BACKBONES), default="efficientnet_lite0",
                       help="the frozen CNN whose activations are encoded")
    train.add_argument("--layer", type=efficientnet_layer, default="block5.depthwise",
                       help=layer_help("the backbone's feature layer giving the local descriptors"))
    train.add_argument("--image-size", type=image_size, default=112,
                       help="images are resized to this square size, in pixels (a batch must fit in memory)")
    train.add_argument("--latent-dim", type=positive_int, default=64,
                       help="latent size d: Fisher vectors have C·(d+1) entries (the library's default is 256)")
    train.add_argument("--hidden", type=positive_int, nargs="*", default=[256],
                       help="hidden widths of the encoder MLP (the library's default is 512)")
    train.add_argument("--lambda-cls", type=float, default=None,
                       help="weight λ3 of the classification loss (None: 1e3 with labels, as the official prototxt; "
                            "0 is FV-VAE⁻)")
    train.add_argument("--iterations", type=positive_int, default=1000,
                       help="training steps (the library's and the paper's default is 5000)")
    train.add_argument("--batch-size", type=positive_int, default=128,
                       help="sets per global batch, split over the processes (a multiple of their number)")
    train.add_argument("--lr", type=float, default=1.0, help="AdaDelta learning rate")
    train.add_argument("--seed", type=int, default=0, help="seed of the initial layer, the batch order and the noise")
    train.add_argument("--checkpoint-every", type=positive_int, default=100,
                       help="steps between checkpoints (the library's default is 500; shorter runs save more often)")
    train.set_defaults(run=run_train)

    finetune = commands.add_parser(
        "finetune", help="fine-tune a trained FV-VAE layer end to end with the backbone's top blocks",
        formatter_class=formatter,
        description="End-to-end fine-tuning (the paper's Table 6, 'w ft'): the layer of a `fvkernels train` checkpoint "
                    "(init) and the backbone's last blocks up to its tap (trainable blocks) are trained together: the "
                    "layer on Algorithm 1's losses (and, with labels and a lambda-fv > 0, a linear classifier's on the "
                    "normalised Fisher vectors), the blocks on the classification ones (or all: trunk losses); the "
                    "backbone's frozen bottom runs once over the corpus. The Fisher is "
                    "then refitted, and the checkpoint holds the layer and the fine-tuned blocks: `fvkernels extract` "
                    "with it as the model encodes with both. Rerunning the same command resumes.")
    add_corpus_arguments(finetune)
    finetune.add_argument("--init", required=True, type=Path, help="the `fvkernels train` checkpoint to start from")
    finetune.add_argument("--checkpoint", required=True, type=Path,
                          help="checkpoint to write, and to resume from (not the init one)")
    finetune.add_argument("--trainable-blocks", type=positive_int, default=2,
                          help="the backbone's blocks up to its tap that train (the tap's block counts as one)")
    finetune.add_argument("--iterations", type=positive_int, default=300, help="fine-tuning steps")
    finetune.add_argument("--batch-size", type=positive_int, default=128,
                          help="sets per global batch, split over the processes (a multiple of their number)")
    finetune.add_argument("--lr", type=non_negative_float, default=1.0, help="AdaDelta learning rate of the layer")
    finetune.add_argument("--trunk-lr", type=non_negative_float, default=0.1,
                          help="AdaDelta learning rate of the backbone's blocks (pretrained: smaller steps)")
    finetune.add_argument("--trunk-losses", choices=("discriminative", "all"), default="discriminative",
                          help="the losses that reach the backbone's blocks: the classification ones (the generative "
                               "ones then train the layer alone), or every one of Algorithm 1")
    finetune.add_argument("--lambda-fv", type=non_negative_float, default=1.0,
                          help="weight of a linear classifier's cross-entropy on the normalised Fisher vectors "
                               "(labelled lists; 0: Algorithm 1's losses only)")
    finetune.add_argument("--seed", type=int, default=0, help="seed of the batch order, the noise and the classifier")
    finetune.add_argument("--checkpoint-every", type=positive_int, default=100, help="steps between checkpoints")
    finetune.set_defaults(run=run_finetune)

    extract = commands.add_parser("extract", help="encode images/videos into sharded FV-VAE Fisher vectors",
                                  description="Writes Fisher vector shards and a manifest; a rerun resumes, and "
                                              "computes again any shard that is missing or damaged.",
                                  formatter_class=formatter)
    add_corpus_arguments(extract)
    extract.add_argument("--model", required=True, type=Path,
                         help="a checkpoint written by `fvkernels train` or `fvkernels finetune`")
    extract.add_argument("--out", required=True, type=Path, help="output folder (new, empty, or an unfinished run)")
    extract.add_argument("--dtype", choices=DTYPES, default="float16", help="dtype of the stored Fisher vectors")
    extract.add_argument("--shard-size", type=positive_int, default=256, help="samples per shard")
    extract.set_defaults(run=run_extract)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
