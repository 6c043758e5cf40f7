"""IDX reading (the Fashion-MNIST format) and stratified subsets, on files written here."""

import numpy as np
import pytest
import torch

from fvkernels.app.datasets import load_fashion_mnist, read_idx, stratified_subset

from tests.helpers import write_idx


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_folder(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    x, y = load_fashion_mnist("test", tmp_path)
    assert torch.equal(x, torch.from_numpy(images)) and torch.equal(y, torch.from_numpy(labels).long())
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_fashion_mnist("train", tmp_path)


def test_bad_files_are_named(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 2), dtype=np.uint8), False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"truncated: header says \(4, 2\)"):
        read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "missing")


def test_stratified_subset_is_balanced_and_deterministic():
    labels = torch.arange(100) % 4
    first = stratified_subset(labels, 20, torch.Generator().manual_seed(1))
    again = stratified_subset(labels, 20, torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and len(set(first.tolist())) == 20
    assert labels[first].bincount().tolist() == [5, 5, 5, 5]
    skewed = torch.tensor([0] * 10 + [1] * 2)
    assert sorted(skewed[stratified_subset(skewed, 8, torch.Generator().manual_seed(0))].tolist()) == [0] * 6 + [1] * 2
