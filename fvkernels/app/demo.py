"""`fvkernels demo`: FV-VAE against the classic set encoders on Fashion-MNIST (the paper's Table 2 and
Fig. 4a in miniature), with the local activations of an ImageNet-pretrained EfficientNet-Lite0.

Every encoder sees the same 7×7 post-activation conv maps; GMM-FV, VLAD and FV-VAE are compared at the
same dimension. FV-VAE's classification weight λ3 is chosen on a validation split carved from the
training images; the test split is used once, for the final numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from tqdm.auto import tqdm

from fvkernels.app.arguments import efficientnet_layer, layer_help, positive_int
from fvkernels.app.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, stratified_subset
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
    parser.add_argument("--train-size", type=positive_int, default=4000, help="training images (incl. validation)")
    parser.add_argument("--test-size", type=positive_int, default=2000, help="test images")
    parser.add_argument("--full", action="store_true", help="all 60000 training and 10000 test images")
    parser.add_argument("--val-fraction", type=validation_share, default=0.2,
                        help="share of training images for choosing λ3, in (0, 1)")
    parser.add_argument("--seed", type=generator_seed, default=0, help="seed of the subsets, the fits and the training")
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


def extract_maps(backbone, images: torch.Tensor, args, device, desc: str) -> torch.Tensor:
    """(N, C, h, w) activations of args.layer for 28×28 images, float32 on `device`."""
    maps = []
    with torch.no_grad():
        for begin in tqdm(range(0, len(images), 256), desc=f"EfficientNet-Lite0 {args.layer} ({desc})"):
            batch = preprocess(images[begin: begin + 256], args.image_size).to(device)
            maps.append(backbone.features(batch, args.layer)[args.layer])
    return torch.cat(maps)


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
    svm = train_svm(train_codes.float().cpu(), train_labels)
    score = accuracy(svm.decision_function(test_codes.float().cpu()), test_labels)
    return Result(name, encoder.dim, score, seconds)


def evaluate_compression(name: str, compression, train_codes, train_labels, test_codes, test_labels) -> Result:
    """Fits a compression of Fisher vectors on the training codes, a linear SVM on the compressed ones, and scores
    the compressed test codes (paper Fig. 4c)."""
    train_compressed = compression.fit_transform(train_codes)
    start = time.perf_counter()
    test_compressed = compression.transform(test_codes)
    seconds = time.perf_counter() - start
    svm = train_svm(train_compressed.float().cpu(), train_labels)
    score = accuracy(svm.decision_function(test_compressed.float().cpu()), test_labels)
    return Result(name, train_compressed.shape[1], score, seconds)


def compressions(args, dims: List[int], train_count: int) -> List[tuple]:
    """(curve, row name, compression) of the main FV-VAE's vectors to each dimension of the sweep: Random Maclaurin
    always, PCA where the training images are at least as many as the components it needs."""
    chosen = []
    for dim in dims:
        chosen.append(("Random Maclaurin", f"Random Maclaurin of FV-VAE (d={args.latent} → {dim})",
                       RandomMaclaurin(dim, seed=args.seed)))
        if dim <= train_count:
            chosen.append(("PCA", f"PCA of FV-VAE (d={args.latent} → {dim})", PCACompression(dim, seed=args.seed)))
        else:
            log(f"PCA to {dim} dimensions skipped: it needs at least {dim} training images, there are {train_count}")
    return chosen


def fvvae_encoder(args, latent: int, lambda_cls: float, seed: int) -> FVVAEEncoder:
    return FVVAEEncoder(latent, (args.hidden,), lambda_cls=lambda_cls, prenorm="descriptor", iterations=args.iterations,
                        batch_size=128, seed=seed)


def choose_lambda(args, fit_maps, fit_labels, val_maps, val_labels) -> Tuple[float, List[Result]]:
    """λ3 with the best validation accuracy (ties: the smaller λ3), and every value's validation result (paper
    Fig. 4b), named "λ3 sweep (validation): …"."""
    sweep = []
    for value in args.lambdas:
        result = evaluate_encoder(f"λ3 sweep (validation): FV-VAE (d={args.latent}, λ3={value:g})",
                                  fvvae_encoder(args, args.latent, value, args.seed), fit_maps, fit_labels, val_maps,
                                  val_labels, fit_labels=True)
        sweep.append(result)
        log(f"  validation: λ3 = {value:g} → accuracy {result.accuracy:.4f}")
    best = max(range(len(sweep)), key=lambda index: (sweep[index].accuracy, -args.lambdas[index]))
    return args.lambdas[best], sweep


def plot_lambda_sweep(values: List[float], sweep: List[Result], chosen: float, path: Path) -> None:
    """Validation accuracy against λ3 (paper Fig. 4b), the chosen value marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5))
    order = sorted(range(len(values)), key=values.__getitem__)
    axes.plot([max(values[i], 1e-3) for i in order], [100 * sweep[i].accuracy for i in order], marker="o")
    axes.axvline(max(chosen, 1e-3), color="grey", linestyle="--", linewidth=1, label=f"chosen λ3 = {chosen:g}")
    axes.set_xscale("log")
    axes.set_xlabel("λ3 (λ3 = 0 drawn at 10⁻³)")
    axes.set_ylabel("validation accuracy (%)")
    axes.set_title("FV-VAE: the classification loss's weight")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_accuracy_vs_dim(curves: Dict[str, List[Result]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for family, results in curves.items():
        results = sorted(results, key=lambda r: r.dim)
        axes.plot([r.dim for r in results], [100 * r.accuracy for r in results], marker="o", label=family)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("dimension of the representation")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("Fashion-MNIST, EfficientNet-Lite0 local activations")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_attention(images, maps, labels, params, path: Path) -> None:
    """Each image beside its map of Σ|FV contribution| per region (the paper's Appendix B)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mass = descriptor_contributions(maps, params).view(len(maps), *maps.shape[2:]).cpu()
    figure, axes = plt.subplots(2, len(images), figsize=(1.6 * len(images), 3.4), squeeze=False)
    for column, (image, heat, label) in enumerate(zip(images.numpy(), (mass / mass.amax((1, 2), keepdim=True)
                                                                        .clamp_min(1e-12)).numpy(), labels)):
        axes[0, column].imshow(image, cmap="gray")
        axes[0, column].set_title(FASHION_MNIST_CLASSES[label], fontsize=8)
        axes[1, column].imshow(image, cmap="gray")
        axes[1, column].imshow(heat, cmap="inferno", alpha=0.6,
                               extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5), interpolation="bilinear")
        for row in range(2):
            axes[row, column].axis("off")
    figure.suptitle("FV-VAE: share of the Fisher vector per region", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_table(results: List[Result]) -> str:
    lines = [f"| {'method':<22} | {'dim':>7} | {'accuracy':>8} | {'encode (s)':>10} |",
             f"|{'-' * 24}|{'-' * 9}|{'-' * 10}|{'-' * 12}|"]
    lines += [f"| {r.method:<22} | {r.dim:>7} | {100 * r.accuracy:>7.2f}% | {r.encode_seconds:>10.3f} |"
              for r in results]
    table = "\n".join(lines)
    print(table)
    return table


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
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    train_images, train_labels = load_fashion_mnist("train", args.data)
    test_images, test_labels = load_fashion_mnist("test", args.data)
    generator = torch.Generator().manual_seed(args.seed)
    if not args.full:
        train_pick = stratified_subset(train_labels, args.train_size, generator)
        test_pick = stratified_subset(test_labels, args.test_size, generator)
        train_images, train_labels = train_images[train_pick], train_labels[train_pick]
        test_images, test_labels = test_images[test_pick], test_labels[test_pick]
    validation = validation_size(train_labels, args.val_fraction)
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"Fashion-MNIST: {len(train_images)} training and {len(test_images)} test images; device {device}")

    backbone = efficientnet_lite0().to(device).eval()
    train_maps = extract_maps(backbone, train_images, args, device, "train")
    test_maps = extract_maps(backbone, test_images, args, device, "test")
    del backbone
    channels, height, width = train_maps.shape[1:]
    log(f"local descriptors: {height}×{width} = {height * width} per image, C = {channels}")
    check_descriptor_count(len(train_maps) * height * width, args)

    fit_maps, fit_labels = train_maps[validation:], train_labels[validation:]
    val_maps, val_labels = train_maps[:validation], train_labels[:validation]
    log(f"choosing λ3 on {validation} validation images (trained on {len(fit_maps)})")
    lambda_cls, lambda_sweep = choose_lambda(args, fit_maps, fit_labels, val_maps, val_labels)
    log(f"λ3 = {lambda_cls:g} chosen on validation among {', '.join(f'{v:g}' for v in args.lambdas)}")

    components = (args.latent + 1) // 2  # GMM-FV: 2·K·C = C·(d+1)
    clusters = args.latent + 1  # VLAD: K·C = C·(d+1)
    main = [
        ("AVE", AverageEncoder(), False),
        ("Concatenation", ConcatEncoder(), False),
        ("Bilinear pooling", BilinearEncoder(full=False), False),
        (f"GMM-FV (K={components})", GMMFisherEncoder(components, seed=args.seed), False),
        (f"VLAD (K={clusters})", VLADEncoder(clusters, seed=args.seed), False),
        (f"FV-VAE⁻ (d={args.latent})", fvvae_encoder(args, args.latent, 0.0, args.seed), False),
        (f"FV-VAE (d={args.latent}, λ3={lambda_cls:g})", fvvae_encoder(args, args.latent, lambda_cls, args.seed), True),
    ]
    results = []
    for name, encoder, needs_labels in main:
        log(f"{name}: fit, encode, linear SVM")
        results.append(evaluate_encoder(name, encoder, train_maps, train_labels, test_maps, test_labels,
                                        fit_labels=needs_labels))
        log(f"  accuracy {100 * results[-1].accuracy:.2f}%")
    final_fvvae = main[-1][1]

    curves = {"FV-VAE": [results[-1]], "GMM-FV": [results[3]], "VLAD": [results[4]]}
    swept = []
    for latent in args.sweep_latents:
        log(f"accuracy vs dimension: d = {latent}, K = {(latent + 1) // 2} / {latent + 1}")
        sweep = [("FV-VAE", f"FV-VAE (d={latent}, λ3={lambda_cls:g})", fvvae_encoder(args, latent, lambda_cls, args.seed),
                  True),
                 ("GMM-FV", f"GMM-FV (K={(latent + 1) // 2})", GMMFisherEncoder((latent + 1) // 2, seed=args.seed), False),
                 ("VLAD", f"VLAD (K={latent + 1})", VLADEncoder(latent + 1, seed=args.seed), False)]
        for family, name, encoder, needs_labels in sweep:
            swept.append(evaluate_encoder(name, encoder, train_maps, train_labels, test_maps, test_labels,
                                          fit_labels=needs_labels))
            curves[family].append(swept[-1])

    # Compression (Fig. 4c): the main FV-VAE's vectors brought down to the sweep's dimensions, beside FV-VAE trained
    # with those smaller d.
    if args.sweep_latents:
        train_codes, test_codes = final_fvvae.transform(train_maps), final_fvvae.transform(test_maps)
        for family, name, compression in compressions(args, [channels * (d + 1) for d in args.sweep_latents],
                                                      len(train_maps)):
            log(f"{name}: fit, compress, linear SVM")
            swept.append(evaluate_compression(name, compression, train_codes, train_labels, test_codes, test_labels))
            curves.setdefault(family, [results[-1]]).append(swept[-1])

    table = print_table(results)
    # Every result, the dimension sweep's too (the table shows the matched-dimension comparison).
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in results + swept + lambda_sweep], indent=2)
                                           + "\n")
    (args.out / "table.md").write_text(table + f"\n\nλ3 = {lambda_cls:g}, chosen on the validation images among "
                                       f"{', '.join(f'{v:g}' for v in args.lambdas)} (lambda_sweep.png)\n")
    plot_accuracy_vs_dim(curves, args.out / "accuracy_vs_dim.png")
    plot_lambda_sweep(args.lambdas, lambda_sweep, lambda_cls, args.out / "lambda_sweep.png")
    shown = [int((test_labels == label).nonzero()[0]) for label in test_labels.unique()[:8].tolist()]
    plot_attention(test_images[shown], test_maps[shown], test_labels[shown].tolist(),
                   final_fvvae.model_.to_params(), args.out / "attention.png")
    log(f"wrote {args.out}/results.json, table.md, accuracy_vs_dim.png, lambda_sweep.png, attention.png")
    return 0
