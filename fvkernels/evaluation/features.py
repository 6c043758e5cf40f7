"""Feature matrices and labels as the classification protocol takes them (torch or numpy), and their
improved normalisation (paper §5.2: signed square root, then L2)."""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from torch import Tensor

from fvkernels.common.checks import check_finite, check_finite_tensors
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
    """values as an (N, D) floating tensor (integer and boolean features are taken as float32); rows holding NaN
    or ±Inf are refused, naming them: every matrix of the classification protocol (features, scores) comes
    through here, and a NaN row would otherwise turn into a prediction or a score without a trace."""
    if hasattr(values, "toarray") and hasattr(values, "nnz"):  # scipy's sparse matrices and arrays
        raise TypeError(f"{name} is a sparse {type(values).__name__}; sparse input is not supported: densify it with "
                        ".toarray()")
    if not isinstance(values, (Tensor, np.ndarray)):  # lists, array-likes with __array__
        values = np.asarray(values)
    if isinstance(values, np.ndarray) and values.dtype == object:
        try:
            values = values.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must hold numbers: every argument must be a string or a number that converts "
                            "to float, got an object array that does not") from None
    tensor = torch.as_tensor(values)
    if tensor.dim() != 2:
        hint = " Reshape your data: (N, 1) for one feature, (1, D) for one sample." if tensor.dim() == 1 else ""
        raise ValueError(f"{name} must be a (N, D) matrix, got shape {tuple(tensor.shape)}.{hint}")
    if tensor.dtype.is_complex:
        raise TypeError(f"{name} must be real, got {tensor.dtype}")
    check_finite(tensor, lambda rows: f"{name} rows {rows} (indices) hold NaN or Inf; clean or drop those rows")
    return tensor if tensor.dtype.is_floating_point else tensor.float()


def class_indices(labels, count: int, name: str = "labels") -> Tuple[np.ndarray, np.ndarray]:
    """The sorted distinct classes of `labels` (any kind: ints, strings, -1/1, …) and each row's index into them.
    Float labels must be whole numbers: NaN or a fraction is a missing label or a regression target, and would
    otherwise become a class of its own."""
    values = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    if values.shape != (count,):
        raise ValueError(f"{name} must be a vector of {count} class labels (one per row), got shape {values.shape}")
    if values.dtype.kind == "f":
        missing = np.flatnonzero(~np.isfinite(values))
        if missing.size:
            raise ValueError(f"{name} of rows {missing[:10].tolist()} (indices) are NaN or Inf; drop those rows or "
                             "give them their class")
        fractional = np.flatnonzero(values != np.round(values))
        if fractional.size:
            raise ValueError(f"{name} must be classes, got fractional values (row {fractional[0]}: "
                             f"{values[fractional[0]].item()!r}); a regression target? map the values to classes")
    return np.unique(values, return_inverse=True)


def fitted_tensors(estimator) -> Dict[str, Tensor]:
    """Everything fit learned as named tensors: the attributes ending in "_" that are tensors, or hold them
    (a dataclass such as DiagonalGMM, a torch module), named like estimator.attribute.field."""
    prefix = type(estimator).__name__
    named: Dict[str, Tensor] = {}
    for attribute, value in vars(estimator).items():
        if not attribute.endswith("_"):
            continue
        if isinstance(value, Tensor):
            named[f"{prefix}.{attribute}"] = value
        elif isinstance(value, torch.nn.Module):
            named.update((f"{prefix}.{attribute}.{key}", tensor) for key, tensor in value.state_dict().items())
        elif dataclasses.is_dataclass(value):
            named.update((f"{prefix}.{attribute}.{field.name}", getattr(value, field.name))
                         for field in dataclasses.fields(value) if isinstance(getattr(value, field.name), Tensor))
    return named


def check_fit_finite(estimator, advice: str) -> None:
    """Refuses a fit that came out NaN or ±Inf from finite inputs (overflow, a diverged optimisation), naming the
    fitted tensor and where, instead of leaving an estimator that encodes or predicts garbage."""
    check_finite_tensors(fitted_tensors(estimator), f"the fit overflowed or diverged on finite inputs; {advice}")


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
