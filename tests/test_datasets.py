"""IDX reading (the Fashion-MNIST format) and stratified subsets, on files written here."""

import os

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


def test_damaged_idx_files_are_named_as_damaged(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "labels.gz", labels, True)
    whole = (tmp_path / "labels.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(whole[:-6])
    with pytest.raises(ValueError, match=r"cut\.gz' is damaged: not a complete gzip stream"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "garbled.gz").write_bytes(whole[:12] + bytes(b ^ 0x5A for b in whole[12:20]) + whole[20:])
    with pytest.raises(ValueError, match=r"garbled\.gz' is damaged: not a complete gzip stream"):
        read_idx(tmp_path / "garbled.gz")
    write_idx(tmp_path / "long", labels, False)
    (tmp_path / "long").write_bytes((tmp_path / "long").read_bytes() + b"\0\0")
    with pytest.raises(ValueError, match=r"long' is damaged \(bytes after its values\): header says \(10,\), found 12"):
        read_idx(tmp_path / "long")
    (tmp_path / "header").write_bytes(bytes([0, 0, 0x08, 3, 0, 0]))
    with pytest.raises(ValueError, match=r"header' is truncated: 6 bytes, shorter than its 3-d header"):
        read_idx(tmp_path / "header")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match=r"fifo' is a FIFO \(named pipe\), not a regular file"):
        read_idx(tmp_path / "fifo")


def test_idx_files_of_the_wrong_shape_or_labels_are_refused(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28 * 28), dtype=np.uint8), False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8), False)
    with pytest.raises(ValueError, match=r"images-idx3-ubyte' holds uint8 \(3, 784\), not \(N, 28, 28\) uint8 images"):
        load_fashion_mnist("test", tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), dtype=np.uint8), False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 9, 10], dtype=np.uint8), False)
    with pytest.raises(ValueError, match=r"labels-idx1-ubyte' holds uint8 \(3,\) values up to 10, not \(N,\) uint8 "
                                         r"labels below 10"):
        load_fashion_mnist("test", tmp_path)
