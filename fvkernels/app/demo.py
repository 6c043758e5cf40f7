"""`fvkernels demo`: FV-VAE against the classic set encoders on Fashion-MNIST (the paper's Table 2, Table 6's
fine-tuning and Fig. 4 in miniature), with the local activations of an ImageNet-pretrained EfficientNet-Lite0.

Every encoder sees the same 7×7 post-activation conv maps; GMM-FV, VLAD and FV-VAE are compared at the
same dimension. FV-VAE's classification weight λ3 is chosen on a validation split carved from the
training images; the test split is used once, for the final numbers. Each seed draws other training and test
subsets and initialisations; the results are reported per seed and as mean ± std over the seeds. Two tasks:
"aligned" (the centred 28×28 items) and "translated" (the items at random positions of a larger canvas, so that
a cell of the map holds another part of the item in each image).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fvkernels.app.arguments import efficientnet_layer, layer_help, non_negative_float, non_negative_int, positive_int
from fvkernels.app.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, place_on_canvas, stratified_subset
from fvkernels.app.efficientnet import efficientnet_lite0, preprocess
from fvkernels.common import extras
from fvkernels.evaluation import (
    AverageEncoder,
    BilinearEncoder,
    ConcatEncoder,
    FVVAEEncoder,
    GMMFisherEncoder,
    PCACompression,
    RandomMaclaurin,
    VLADEncoder,
    accuracy,
    descriptor_contributions,
    train_svm,
)
from fvkernels.training import SetData, train
from fvkernels.training.loop import TRUNK_LOSSES

_START = time.perf_counter()


def log(message: str) -> None:
    """Progress lines stamped with the seconds since the demo started."""
    print(f"[{time.perf_counter() - _START:6.0f} s] {message}", flush=True)


@dataclass
class Result:
    method: str
    dim: int
    accuracy: float
    encode_seconds: float
    task: str = "aligned"
    seed: int = 0
    part: str = "table"  # or "dimension sweep", "compression", "λ3 sweep": where the row is reported
    lambda_cls: Optional[float] = None  # FV-VAE's λ3 where this run chose it on validation


TASKS = ("aligned", "translated")
CANVAS_STREAM = 1 << 32  # the translated task's positions: seed | 2³², never a seed of the subsets


MAX_SEED = 2 ** 32 - 1


def validation_share(text: str) -> float:
    """argparse type of --val-fraction: a share in (0, 1); 0 leaves no images to choose λ3 on, 1 none to train on."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


def generator_seed(text: str) -> int:
    """argparse type of --seed: a whole number in 0…2³²−1, refused here rather than by a generator later."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number in 0…{MAX_SEED}, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a whole number in 0…{MAX_SEED}, got {value}")
    return value


def generator_seeds(text: str) -> List[int]:
    """argparse type of --seeds: one or more comma-separated seeds, each a whole number in 0…2³²−1, no repeats."""
    seeds = [generator_seed(item.strip()) for item in text.split(",")]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def task_names(text: str) -> List[str]:
    """argparse type of --tasks: comma-separated names of TASKS."""
    tasks = [item.strip() for item in text.split(",")]
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or len(set(tasks)) != len(tasks):
        raise argparse.ArgumentTypeError(f"expected distinct names among {', '.join(TASKS)}, got {text!r}")
    return tasks


def scale_jitter(text: str) -> float:
    """argparse type of --scale-jitter: a finite factor ≥ 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"expected a finite number ≥ 1 (1: no rescaling), got {text!r}")
    return value


def trunk_loss_choices(text: str) -> List[str]:
    """argparse type of --trunk-losses: comma-separated names of fvkernels.training.loop.TRUNK_LOSSES."""
    chosen = [item.strip() for item in text.split(",")]
    if any(item not in TRUNK_LOSSES for item in chosen) or len(set(chosen)) != len(chosen):
        raise argparse.ArgumentTypeError(f"expected distinct names among {', '.join(TRUNK_LOSSES)}, got {text!r}")
    return chosen


def positive_ints(text: str) -> List[int]:
    """argparse type of a comma-separated list of positive integers ("" for none)."""
    return [positive_int(item) for item in text.split(",") if item.strip()]


def lambda_values(text: str) -> List[float]:
    """argparse type of --lambdas: one or more comma-separated finite numbers ≥ 0 (λ3 = 0 is FV-VAE⁻)."""
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers ≥ 0, got {item!r} in {text!r}")
        values.append(value)
    return values


def add_arguments(parser) -> None:
    """The demo's options. Its FV-VAE is smaller and shorter-trained than the library's defaults (d = 256,
    5000 steps) so that the whole comparison runs in minutes on two CPU cores."""
    parser.add_argument("--data", type=Path, default=None,
                        help="folder with the Fashion-MNIST IDX files; None: Debian's dataset-fashion-mnist")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="where results.json and the plots go")
    parser.add_argument("--train-size", type=positive_int, default=3000, help="training images (incl. validation)")
    parser.add_argument("--test-size", type=positive_int, default=1000, help="test images")
    parser.add_argument("--full", action="store_true",
                        help="all 60000 training and 10000 test images (every seed then sees the same images: the "
                             "spread is that of the initialisations alone)")
    parser.add_argument("--val-fraction", type=validation_share, default=0.2,
                        help="share of training images for choosing λ3, in (0, 1)")
    parser.add_argument("--seeds", type=generator_seeds, default="0",
                        help="comma-separated seeds; each runs every method on its own training and test subsets and "
                             "initialisations, and the table reports mean ± std over them")
    parser.add_argument("--tasks", type=task_names, default="aligned",
                        help="'aligned' (the centred items), 'translated' (each item at a random place of a "
                             "black canvas of side canvas), or both, comma-separated")
    parser.add_argument("--canvas", type=positive_int, default=56, help="side of the translated task's canvas (px)")
    parser.add_argument("--scale-jitter", type=scale_jitter, default=1.0,
                        help="translated task: items also resized by a factor log-uniform in [1/s, s] (1: none)")
    parser.add_argument("--image-size", type=positive_int, default=112, help="side the 28×28 images are resized to")
    parser.add_argument("--layer", type=efficientnet_layer, default="block5.depthwise",
                        help=layer_help("EfficientNet-Lite0 tap giving the local descriptors"))
    parser.add_argument("--latent", type=positive_int, default=31,
                        help="FV-VAE latent size d (FV dim C·(d+1); the library's default is 256)")
    parser.add_argument("--sweep-latents", type=positive_ints, default="7,15",
                        help="other d for the accuracy-vs-dimension plot (comma-separated; '' for none)")
    parser.add_argument("--hidden", type=positive_int, default=512, help="width of the encoder's hidden layer")
    parser.add_argument("--iterations", type=positive_int, default=400,
                        help="training steps of 128 sets per FV-VAE (the library's default is 5000)")
    parser.add_argument("--lambdas", type=lambda_values, default="10,1000",
                        help="λ3 values tried on the validation split (comma-separated, ≥ 0); the paper's sweep (Fig. "
                             "4b): 1,10,100,1000,10000,100000")
    parser.add_argument("--finetune-iterations", type=non_negative_int, default=150,
                        help="steps of end-to-end fine-tuning of the main FV-VAE with the backbone's top blocks "
                             "(paper Table 6, 'w ft'); 0 leaves the fine-tuned row out")
    parser.add_argument("--trainable-blocks", type=positive_int, default=2,
                        help="fine-tuning: the backbone's blocks up to the tap (the tap's own counts) that train with the "
                             "layer")
    parser.add_argument("--trunk-lr", type=non_negative_float, default=0.1,
                        help="fine-tuning: AdaDelta rate of the backbone's blocks (the layer's is 1)")
    parser.add_argument("--trunk-losses", type=trunk_loss_choices, default="discriminative",
                        help="fine-tuning: the losses that reach the backbone's blocks, one fine-tuned row each: "
                             "'discriminative' (the classification ones), 'all' (every one of Algorithm 1), or both")
    parser.add_argument("--lambda-fv", type=non_negative_float, default=1.0,
                        help="fine-tuning: weight of a linear classifier's cross-entropy on the normalised Fisher "
                             "vectors (0: Algorithm 1's losses only)")


def extract_maps(backbone, split: Optional[tuple], images: torch.Tensor, args, device, desc: str
                 ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """(the maps of the split's bottom layer, those of args.layer) for grayscale images, float32 on `device`; with a
    split (bottom layer, top) the second come from the first through the top: the fine-tuned rows train the top on
    the first, every encoder sees the second. Without one (no fine-tuning), (None, the maps)."""
    bottoms, maps = [], []
    with torch.no_grad():
        for begin in tqdm(range(0, len(images), 256), desc=f"EfficientNet-Lite0 {args.layer} ({desc})"):
            batch = preprocess(images[begin: begin + 256], args.image_size).to(device)
            if split is None:
                maps.append(backbone.features(batch, args.layer)[args.layer])
                continue
            bottom_layer, top = split
            bottoms.append(backbone.features(batch, bottom_layer)[bottom_layer])
            maps.append(top(bottoms[-1]))
    return (torch.cat(bottoms) if split is not None else None), torch.cat(maps)


def evaluate_encoder(name: str, encoder, train_maps, train_labels, test_maps, test_labels, *,
                     fit_labels: bool = False) -> Result:
    """Fits the encoder on the training maps, a linear SVM on their codes, and scores the test maps."""
    if fit_labels:
        encoder.fit(train_maps, train_labels.to(train_maps.device))
    else:
        encoder.fit(train_maps)
    train_codes = encoder.transform(train_maps)
    start = time.perf_counter()
    test_codes = encoder.transform(test_maps)
    if test_codes.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return Result(name, encoder.dim, svm_accuracy(train_codes, train_labels, test_codes, test_labels), seconds)


def svm_accuracy(train_codes, train_labels, test_codes, test_labels) -> float:
    """Test accuracy of a linear SVM fitted on the training codes."""
    svm = train_svm(train_codes.float().cpu(), train_labels)
    return accuracy(svm.decision_function(test_codes.float().cpu()), test_labels)


def evaluate_compression(name: str, compression, train_codes, train_labels, test_codes, test_labels) -> Result:
    """Fits a compression of Fisher vectors on the training codes, a linear SVM on the compressed ones, and scores
    the compressed test codes (paper Fig. 4c)."""
    train_compressed = compression.fit_transform(train_codes)
    start = time.perf_counter()
    test_compressed = compression.transform(test_codes)
    seconds = time.perf_counter() - start
    return Result(name, train_compressed.shape[1], svm_accuracy(train_compressed, train_labels, test_compressed,
                                                                test_labels), seconds)


def evaluate_fine_tuned(name: str, encoder: FVVAEEncoder, top, bottoms: Tuple[torch.Tensor, torch.Tensor],
                        labels: Tuple[torch.Tensor, torch.Tensor], args, seed: int, trunk_losses: str) -> Result:
    """End-to-end fine-tuning (paper Table 6, "w ft"): the trained FV-VAE layer of `encoder` and a copy of the
    backbone's top blocks trained together on the training images' bottom maps (Algorithm 1's losses and a linear
    classifier's on the normalised Fisher vectors, args.lambda_fv; those trunk_losses names reach the blocks), the
    Fisher refitted on the fine-tuned maps, then a linear SVM on the vectors, as for every other row.
    encode_seconds: the test maps through the top and the layer."""
    (train_bottom, test_bottom), (train_labels, test_labels) = bottoms, labels
    layer, trunk = copy.deepcopy(encoder.model_), copy.deepcopy(top)
    classes = getattr(encoder, "classes_", None)  # absent when λ3 = 0 was chosen: no labels in its fit
    classes = np.unique(train_labels.numpy()) if classes is None else classes
    indices = torch.as_tensor(np.searchsorted(classes, train_labels.numpy()), device=train_bottom.device)
    fv_classifier = None
    if args.lambda_fv:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fv_classifier = nn.Linear(layer.output_dim, len(classes)).to(train_bottom.device)
    train(layer, SetData(train_bottom, indices), iterations=args.finetune_iterations, batch_size=128, seed=seed,
          trunk=trunk, trunk_lr=args.trunk_lr, trunk_losses=trunk_losses, fv_classifier=fv_classifier,
          lambda_fv=args.lambda_fv)

    def encode(bottom):
        return torch.cat([layer(trunk(chunk)) for chunk in bottom.split(256)])

    with torch.no_grad():
        layer.fit_fisher(trunk(chunk) for chunk in train_bottom.split(256))
        train_codes = encode(train_bottom)
        start = time.perf_counter()
        test_codes = encode(test_bottom)
        seconds = time.perf_counter() - start
    return Result(name, layer.output_dim, svm_accuracy(train_codes, train_labels, test_codes, test_labels), seconds)


def compressions(args, dims: List[int], train_count: int, seed: int) -> List[tuple]:
    """(curve, row name, compression) of the main FV-VAE's vectors to each dimension of the sweep: Random Maclaurin
    always, PCA where the training images are at least as many as the components it needs."""
    chosen = []
    for dim in dims:
        chosen.append(("Random Maclaurin", f"Random Maclaurin of FV-VAE (d={args.latent} → {dim})",
                       RandomMaclaurin(dim, seed=seed)))
        if dim <= train_count:
            chosen.append(("PCA", f"PCA of FV-VAE (d={args.latent} → {dim})", PCACompression(dim, seed=seed)))
        else:
            log(f"PCA to {dim} dimensions skipped: it needs at least {dim} training images, there are {train_count}")
    return chosen


def fvvae_encoder(args, latent: int, lambda_cls: float, seed: int) -> FVVAEEncoder:
    return FVVAEEncoder(latent, (args.hidden,), lambda_cls=lambda_cls, prenorm="descriptor", iterations=args.iterations,
                        batch_size=128, seed=seed)


def choose_lambda(args, fit_maps, fit_labels, val_maps, val_labels, seed: int) -> Tuple[float, List[Result]]:
    """λ3 with the best validation accuracy (ties: the smaller λ3), and every value's validation result (paper
    Fig. 4b), named "λ3 sweep (validation): …"."""
    sweep = []
    for value in args.lambdas:
        result = evaluate_encoder(f"λ3 sweep (validation): FV-VAE (d={args.latent}, λ3={value:g})",
                                  fvvae_encoder(args, args.latent, value, seed), fit_maps, fit_labels, val_maps,
                                  val_labels, fit_labels=True)
        result.lambda_cls = value
        sweep.append(result)
        log(f"  validation: λ3 = {value:g} → accuracy {result.accuracy:.4f}")
    best = max(range(len(sweep)), key=lambda index: (sweep[index].accuracy, -args.lambdas[index]))
    return args.lambdas[best], sweep


def summarize(results: List[Result]) -> List[dict]:
    """One row per (task, part, method): mean and sample std of the accuracy over the seeds, the seeds, the mean
    encoding time; in the order the methods first appear."""
    groups: Dict[tuple, List[Result]] = {}
    for result in results:
        groups.setdefault((result.task, result.part, result.method), []).append(result)
    summary = []
    for (task, part, method), group in groups.items():
        accuracies = np.array([result.accuracy for result in group])
        summary.append(dict(task=task, part=part, method=method, dim=group[0].dim, mean=float(accuracies.mean()),
                            std=float(accuracies.std(ddof=1)) if len(group) > 1 else 0.0,
                            seeds=[result.seed for result in group],
                            encode_seconds=float(np.mean([result.encode_seconds for result in group]))))
    return summary


def family(method: str) -> Optional[str]:
    """The accuracy-vs-dimension curve a row belongs to (paper Fig. 4a and 4c), None for the others."""
    for prefix, name in (("FV-VAE (d=", "FV-VAE"), ("GMM-FV", "GMM-FV"), ("VLAD", "VLAD"),
                         ("Random Maclaurin", "Random Maclaurin"), ("PCA", "PCA")):
        if method.startswith(prefix):
            return name
    return None


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_lambda_sweep(summary: List[dict], chosen: Dict[str, List[float]], path: Path) -> None:
    """Validation accuracy against λ3 (paper Fig. 4b), mean ± std over the seeds, one line per task; the values the
    seeds chose in the legend."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 3.8))
    for task, values in chosen.items():
        rows = sorted((row for row in summary if row["task"] == task and row["part"] == "λ3 sweep"),
                      key=lambda row: float(row["method"].split("λ3=")[1].rstrip(")")))
        lambdas = [max(float(row["method"].split("λ3=")[1].rstrip(")")), 1e-3) for row in rows]
        axes.errorbar(lambdas, [100 * row["mean"] for row in rows], yerr=[100 * row["std"] for row in rows],
                      marker="o", capsize=3, label=f"{task} (chosen: {', '.join(f'{v:g}' for v in values)})")
    axes.set_xscale("log")
    axes.set_xlabel("λ3 (λ3 = 0 drawn at 10⁻³)")
    axes.set_ylabel("validation accuracy (%)")
    axes.set_title("FV-VAE: the classification loss's weight")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_accuracy_vs_dim(summary: List[dict], tasks: List[str], path: Path) -> None:
    """Test accuracy against dimension, mean ± std over the seeds (paper Fig. 4a: the encoders; 4c: the
    compressions of the main FV-VAE), one panel per task."""
    plt = _pyplot()
    figure, panels = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for axes, task in zip(panels[0], tasks):
        curves: Dict[str, List[dict]] = {}
        for row in summary:
            name = family(row["method"])
            if row["task"] == task and name is not None and row["part"] != "λ3 sweep":
                curves.setdefault(name, []).append(row)
        main = next((row for row in curves.get("FV-VAE", []) if row["part"] == "table"), None)
        for name, rows in curves.items():
            if name in ("Random Maclaurin", "PCA") and main is not None:
                rows = rows + [main]  # a compression starts from the main FV-VAE's vectors
            rows = sorted(rows, key=lambda row: row["dim"])
            axes.errorbar([row["dim"] for row in rows], [100 * row["mean"] for row in rows],
                          yerr=[100 * row["std"] for row in rows], marker="o", capsize=3, label=name,
                          linestyle="--" if name in ("Random Maclaurin", "PCA") else "-")
        axes.set_xscale("log", base=2)
        axes.set_xlabel("dimension of the representation")
        axes.set_ylabel("test accuracy (%)")
        axes.set_title(f"Fashion-MNIST {task}, EfficientNet-Lite0 local activations", fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_attention(images, maps, labels, params, path: Path) -> None:
    """Each image beside its map of Σ|FV contribution| per region (the paper's Appendix B)."""
    plt = _pyplot()
    mass = descriptor_contributions(maps, params).view(len(maps), *maps.shape[2:]).cpu()
    figure, axes = plt.subplots(2, len(images), figsize=(1.6 * len(images), 3.4), squeeze=False)
    for column, (image, heat, label) in enumerate(zip(images.numpy(), (mass / mass.amax((1, 2), keepdim=True)
                                                                        .clamp_min(1e-12)).numpy(), labels)):
        axes[0, column].imshow(image, cmap="gray")
        axes[0, column].set_title(FASHION_MNIST_CLASSES[label], fontsize=8)
        axes[1, column].imshow(image, cmap="gray")
        axes[1, column].imshow(heat, cmap="inferno", alpha=0.6, interpolation="bilinear",
                               extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
        for row in range(2):
            axes[row, column].axis("off")
    figure.suptitle("FV-VAE: share of the Fisher vector per region", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def format_table(summary: List[dict], task: str) -> str:
    """The task's main comparison as Markdown: accuracy mean ± std over the seeds."""
    rows = [row for row in summary if row["task"] == task and row["part"] == "table"]
    seeds = max((len(row["seeds"]) for row in rows), default=0)
    lines = [f"| {'method':<34} | {'dim':>7} | {f'accuracy ({seeds} seed' + ('s' if seeds > 1 else '') + ')':>20} "
             f"| {'encode (s)':>10} |",
             f"|{'-' * 36}|{'-' * 9}|{'-' * 22}|{'-' * 12}|"]
    for row in rows:  # one seed has no spread to show
        score = f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f}%" if seeds > 1 else f"{100 * row['mean']:.2f}%"
        lines.append(f"| {row['method']:<34} | {row['dim']:>7} | {score:>20} | {row['encode_seconds']:>10.3f} |")
    return "\n".join(lines)


def validation_size(labels: torch.Tensor, share: float) -> int:
    """How many of the (shuffled) training images choose λ3; refuses a split the choice cannot run on."""
    count = int(len(labels) * share)
    if count < 1:
        raise ValueError(f"--val-fraction {share} of {len(labels)} training images leaves no validation image; raise "
                         "--train-size or --val-fraction")
    classes = labels[count:].unique().tolist()
    if len(classes) < 2:
        raise ValueError(f"the {len(labels) - count} training images left beside the {count} validation ones hold only "
                         f"class(es) {classes}, and the SVM needs two; raise --train-size or lower --val-fraction")
    return count


def check_descriptor_count(num_descriptors: int, args) -> None:
    """Refuses, before the fits, a --latent or --sweep-latents too large for the training descriptors: VLAD at
    the FV's dimension C·(d+1) needs d+1 k-means clusters."""
    latent = max([args.latent, *args.sweep_latents])
    if num_descriptors < latent + 1:
        raise ValueError(f"d = {latent} needs {latent + 1} VLAD clusters but the training images give only "
                         f"{num_descriptors} descriptors; lower --latent/--sweep-latents or raise --train-size or "
                         "--image-size")




def run(args) -> int:
    extras.require("demo", "fvkernels demo")  # before the long work, not at the plots at its end
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_images, train_labels = load_fashion_mnist("train", args.data)
    test_images, test_labels = load_fashion_mnist("test", args.data)
    backbone = efficientnet_lite0().to(device).eval()
    split = backbone.split(args.layer, args.trainable_blocks) if args.finetune_iterations else None
    if "translated" in args.tasks:  # a canvas too small for the items is refused now, not after the aligned task
        place_on_canvas(train_images[:0], args.canvas, torch.Generator(), args.scale_jitter)
    for seed in args.seeds:  # every refusal of a split or size before the first long run
        images = subsets(args, seed, train_images, train_labels, test_images, test_labels)
        validation_size(images[1], args.val_fraction)
    args.out.mkdir(parents=True, exist_ok=True)
    results, chosen, attention = [], {}, {}
    for task in args.tasks:
        for seed in args.seeds:
            log(f"task {task}, seed {seed}")
            (train_x, train_y, test_x, test_y) = subsets(args, seed, train_images, train_labels, test_images,
                                                         test_labels)
            if task == "translated":
                # a stream of its own: subset seeds are below 2³², this one at or above it
                canvas = torch.Generator().manual_seed(CANVAS_STREAM | seed)
                train_x = place_on_canvas(train_x, args.canvas, canvas, args.scale_jitter)
                test_x = place_on_canvas(test_x, args.canvas, canvas, args.scale_jitter)
            runs, lambda_cls, encoder, test_maps = run_once(args, seed, backbone, split, device,
                                                            (train_x, train_y, test_x, test_y))
            results += [replace(result, task=task, seed=seed) for result in runs]
            chosen.setdefault(task, []).append(lambda_cls)
            attention.setdefault(task, (test_x, test_y, test_maps, encoder))
    summary = summarize(results)
    tables = []
    for task in args.tasks:
        table = format_table(summary, task)
        print(f"\n{task}:\n{table}")
        tables.append(f"## {task}\n\n{table}\n\nλ3 chosen on each seed's validation images among "
                      f"{', '.join(f'{v:g}' for v in args.lambdas)}: {', '.join(f'{v:g}' for v in chosen[task])} "
                      f"(seeds {', '.join(map(str, args.seeds))}; lambda_sweep.png)\n")
    config = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
              if key not in ("run", "command", "data", "out")}
    (args.out / "results.json").write_text(json.dumps({"config": config, "summary": summary,
                                                       "runs": [asdict(result) for result in results]}, indent=2)
                                           + "\n")
    (args.out / "table.md").write_text("\n".join(tables))
    plot_accuracy_vs_dim(summary, args.tasks, args.out / "accuracy_vs_dim.png")
    plot_lambda_sweep(summary, chosen, args.out / "lambda_sweep.png")
    figures = ["accuracy_vs_dim.png", "lambda_sweep.png"]
    for task, (images, labels, maps, encoder) in attention.items():
        shown = [int((labels == label).nonzero()[0]) for label in labels.unique()[:8].tolist()]
        name = "attention.png" if task == "aligned" else f"attention_{task}.png"
        plot_attention(images[shown], maps[shown], labels[shown].tolist(), encoder.model_.to_params(), args.out / name)
        figures.append(name)
    log(f"wrote {args.out}/results.json, table.md, {', '.join(figures)}")
    return 0


def subsets(args, seed: int, train_images, train_labels, test_images, test_labels) -> tuple:
    """The seed's training and test images and labels: stratified subsets, or everything with --full."""
    if args.full:
        return train_images, train_labels, test_images, test_labels
    generator = torch.Generator().manual_seed(seed)
    train_pick = stratified_subset(train_labels, args.train_size, generator)
    test_pick = stratified_subset(test_labels, args.test_size, generator)
    return train_images[train_pick], train_labels[train_pick], test_images[test_pick], test_labels[test_pick]


def run_once(args, seed: int, backbone, split: Optional[tuple], device, images: tuple) -> tuple:
    """Every method on one task and seed: (results, the λ3 chosen, the main FV-VAE encoder, the test maps)."""
    train_images, train_labels, test_images, test_labels = images
    torch.manual_seed(seed)
    validation = validation_size(train_labels, args.val_fraction)
    log(f"Fashion-MNIST: {len(train_images)} training and {len(test_images)} test images of "
        f"{train_images.shape[1]}×{train_images.shape[2]}; device {device}")
    train_bottom, train_maps = extract_maps(backbone, split, train_images, args, device, "train")
    test_bottom, test_maps = extract_maps(backbone, split, test_images, args, device, "test")
    channels, height, width = train_maps.shape[1:]
    log(f"local descriptors: {height}×{width} = {height * width} per image, C = {channels}")
    check_descriptor_count(len(train_maps) * height * width, args)

    fit_maps, fit_labels = train_maps[validation:], train_labels[validation:]
    val_maps, val_labels = train_maps[:validation], train_labels[:validation]
    log(f"choosing λ3 on {validation} validation images (trained on {len(fit_maps)})")
    lambda_cls, lambda_sweep = choose_lambda(args, fit_maps, fit_labels, val_maps, val_labels, seed)
    log(f"λ3 = {lambda_cls:g} chosen on validation among {', '.join(f'{v:g}' for v in args.lambdas)}")

    components = (args.latent + 1) // 2  # GMM-FV: 2·K·C = C·(d+1)
    clusters = args.latent + 1  # VLAD: K·C = C·(d+1)
    main = [
        ("AVE", AverageEncoder(), False),
        ("Concatenation", ConcatEncoder(), False),
        ("Bilinear pooling", BilinearEncoder(full=False), False),
        (f"GMM-FV (K={components})", GMMFisherEncoder(components, seed=seed), False),
        (f"VLAD (K={clusters})", VLADEncoder(clusters, seed=seed), False),
        (f"FV-VAE⁻ (d={args.latent})", fvvae_encoder(args, args.latent, 0.0, seed), False),
        (f"FV-VAE (d={args.latent})", fvvae_encoder(args, args.latent, lambda_cls, seed), True),
    ]
    results = []
    for name, encoder, needs_labels in main:
        log(f"{name}: fit, encode, linear SVM")
        results.append(evaluate_encoder(name, encoder, train_maps, train_labels, test_maps, test_labels,
                                        fit_labels=needs_labels))
        log(f"  accuracy {100 * results[-1].accuracy:.2f}%")
    results[-1].lambda_cls = lambda_cls
    final_fvvae = main[-1][1]
    for trunk_losses in args.trunk_losses if args.finetune_iterations else ():
        name = f"FV-VAE fine-tuned (d={args.latent}, {args.trainable_blocks} blocks" + (
            ", every loss into them)" if trunk_losses == "all" else ")")
        log(f"{name}: {args.finetune_iterations} steps with the backbone's top, Fisher refitted, linear SVM")
        results.append(evaluate_fine_tuned(name, final_fvvae, split[1], (train_bottom, test_bottom),
                                           (train_labels, test_labels), args, seed, trunk_losses))
        results[-1].lambda_cls = lambda_cls
        log(f"  accuracy {100 * results[-1].accuracy:.2f}%")

    for latent in args.sweep_latents:
        log(f"accuracy vs dimension: d = {latent}, K = {(latent + 1) // 2} / {latent + 1}")
        sweep = [(f"FV-VAE (d={latent})", fvvae_encoder(args, latent, lambda_cls, seed), True),
                 (f"GMM-FV (K={(latent + 1) // 2})", GMMFisherEncoder((latent + 1) // 2, seed=seed), False),
                 (f"VLAD (K={latent + 1})", VLADEncoder(latent + 1, seed=seed), False)]
        for name, encoder, needs_labels in sweep:
            results.append(replace(evaluate_encoder(name, encoder, train_maps, train_labels, test_maps, test_labels,
                                                    fit_labels=needs_labels), part="dimension sweep"))

    # Compression (Fig. 4c): the main FV-VAE's vectors brought down to the sweep's dimensions, beside FV-VAE trained
    # with those smaller d.
    if args.sweep_latents:
        train_codes, test_codes = final_fvvae.transform(train_maps), final_fvvae.transform(test_maps)
        for _, name, compression in compressions(args, [channels * (d + 1) for d in args.sweep_latents],
                                                 len(train_maps), seed):
            log(f"{name}: fit, compress, linear SVM")
            results.append(replace(evaluate_compression(name, compression, train_codes, train_labels, test_codes,
                                                        test_labels), part="compression"))
    results += [replace(result, part="λ3 sweep") for result in lambda_sweep]
    return results, lambda_cls, final_fvvae, test_maps
