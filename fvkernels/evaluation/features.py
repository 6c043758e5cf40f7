"""Feature matrices and labels as the classification protocol takes them (torch or numpy), and their
improved normalisation (paper §5.2: signed square root, then L2)."""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from torch import Tensor

from fvkernels.common.tensors import improved_normalisation

ArrayLike = Union[Tensor, np.ndarray]


class NotFitted(NotFittedError, RuntimeError):
    """An estimator used before fit: scikit-learn's NotFittedError, and the RuntimeError earlier releases raised."""


def normalize(features: ArrayLike) -> ArrayLike:
    """Row-wise sign(x)·sqrt(|x|), then division by the row's L2 norm (floored at 1e-12, so a zero row
    stays zero): fvkernels.common.tensors.improved_normalisation. Returns the input's type: torch in, torch out;
    numpy in, numpy out."""
    out = improved_normalisation(as_matrix(features, "features"))
    return out.numpy() if isinstance(features, np.ndarray) else out


def as_matrix(values: ArrayLike, name: str) -> Tensor:
    """values as an (N, D) floating tensor (integer and boolean features are taken as float32)."""
    tensor = torch.as_tensor(values)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a (N, D) matrix, got shape {tuple(tensor.shape)}")
    if tensor.dtype.is_complex:
        raise TypeError(f"{name} must be real, got {tensor.dtype}")
    return tensor if tensor.dtype.is_floating_point else tensor.float()


def as_labels(labels: ArrayLike, count: int, num_classes: Optional[int] = None) -> Tensor:
    tensor = torch.as_tensor(labels)
    if tensor.dim() != 1 or tensor.shape[0] != count:
        raise ValueError(f"labels must be a vector of {count} class indices (one per row), "
                         f"got shape {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {tensor.dtype}")
    if num_classes is not None and count and (int(tensor.min()) < 0 or int(tensor.max()) >= num_classes):
        raise ValueError(f"labels must index the {num_classes} score columns (0…{num_classes - 1}), got values "
                         f"in [{int(tensor.min())}, {int(tensor.max())}]")
    return tensor.long()
