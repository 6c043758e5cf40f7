"""Training sets held in memory, and the fingerprint that tells a resumed run it has the same data."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fvkernels.common.files import tensor_bytes


@dataclass
class SetData:
    """Training sets held in memory: acts (N, C, H, W) or (N, T, C), labels (N,) or None, lengths (N,) or None."""

    acts: Tensor
    labels: Optional[Tensor] = None
    lengths: Optional[Tensor] = None

    def __post_init__(self) -> None:
        for name in ("acts", "labels", "lengths"):  # numpy arrays and lists welcome
            value = getattr(self, name)
            if value is not None and not isinstance(value, Tensor):
                setattr(self, name, torch.as_tensor(value))
        for name in ("labels", "lengths"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 1 or len(value) != len(self.acts)):
                raise ValueError(f"{name} must have shape (N,) = ({len(self.acts)},) to match acts "
                                 f"{tuple(self.acts.shape)}, got {tuple(value.shape)}")

    def __len__(self) -> int:
        return len(self.acts)

    def fingerprint(self, values: int = 1 << 16) -> str:
        """sha256 of the shapes, dtypes, labels and lengths, and of `values` activations evenly spaced over
        all of them: reading a sample instead of every value keeps it instant for GBs of activations."""
        digest = hashlib.sha256(f"{tuple(self.acts.shape)} {self.acts.dtype}\n".encode())
        count = min(values, self.acts.numel())
        positions = torch.linspace(0, self.acts.numel() - 1, count, dtype=torch.float64).round().long()
        sampled = self.acts[torch.unravel_index(positions.to(self.acts.device), self.acts.shape)]
        for tensor in (sampled, self.labels, self.lengths):
            if tensor is None:
                digest.update(b"none\n")
                continue
            digest.update(f"{tensor.dtype}\n".encode())
            digest.update(tensor_bytes(tensor))
        return digest.hexdigest()

    def batch(self, indices: Tensor, device) -> tuple:
        def take(t):
            return None if t is None else t[indices].to(device, non_blocking=True)
        return take(self.acts), take(self.labels), take(self.lengths)
