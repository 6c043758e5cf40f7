"""Descriptor sets as the set encoders take them: an (N, T, C) tensor, (N, C, H, W) feature maps or a list of
(T_i, C) tensors, validated (shapes, dtypes, finite values), read in bounded chunks or sampled."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fvkernels.common.checks import check_finite

# Largest intermediate of one chunk (elements): big enough for efficient GEMMs, small next to memory.
CHUNK_ELEMENTS = 1 << 24
DEFAULT_FIT_DESCRIPTORS = 200_000

SetsLike = Union[Tensor, np.ndarray, Sequence[Tensor], Sequence[np.ndarray]]


def progress_disabled(progress: Optional[bool]) -> Optional[bool]:
    """tqdm's `disable`: None shows bars only on a terminal."""
    return None if progress is None else not progress


class DescriptorSets:
    """The sets handed to fit/transform, validated, with chunked and sampled access. numpy arrays are taken as
    tensors (without a copy where they can be); `as_input_type` turns a result back into the input's kind.

    Sets holding NaN or ±Inf are refused here, naming them, before any work: every encoder's fit and transform
    take their sets through this class, and a NaN would otherwise end in a fitted GMM, k-means centres, a trained
    layer or an encoding, or (a fit subsamples) not be seen at all."""

    def __init__(self, sets: SetsLike):
        self.from_numpy = isinstance(sets, np.ndarray) or (
            isinstance(sets, (list, tuple)) and len(sets) > 0 and all(isinstance(item, np.ndarray) for item in sets))
        if isinstance(sets, np.ndarray) and sets.dtype == object:  # ragged: an array of (T_i, C) arrays
            sets = [np.asarray(item) for item in sets]
        if isinstance(sets, np.ndarray):
            sets = torch.from_numpy(np.ascontiguousarray(sets))
        elif self.from_numpy:
            sets = [torch.from_numpy(np.ascontiguousarray(item)) for item in sets]
        if isinstance(sets, Tensor):
            if sets.dim() == 4:
                sets = sets.flatten(2).transpose(1, 2)  # (N, C, H, W) maps → (N, H·W, C), a view
            if sets.dim() != 3:
                raise ValueError(f"sets must be an (N, T, C) tensor, (N, C, H, W) feature maps or a list of "
                                 f"(T_i, C) tensors, got a tensor of shape {tuple(sets.shape)}")
            self.tensor, self.items = sets, None
            self.lengths = torch.full((sets.shape[0],), sets.shape[1], dtype=torch.long)
            reference = sets
        elif isinstance(sets, (list, tuple)):
            if not sets:
                raise ValueError("sets is an empty list; give at least one (T_i, C) tensor")
            for index, item in enumerate(sets):
                if not isinstance(item, Tensor) or item.dim() != 2:
                    what = f"shape {tuple(item.shape)}" if isinstance(item, Tensor) else type(item).__name__
                    raise ValueError(f"sets[{index}] must be a (T_i, C) tensor, got {what}")
            reference = sets[0]
            for index, item in enumerate(sets):
                if item.shape[1] != reference.shape[1]:
                    raise ValueError(f"all sets must have the same C: sets[0] has C = {reference.shape[1]}, "
                                     f"sets[{index}] has C = {item.shape[1]}")
                if item.dtype != reference.dtype or item.device != reference.device:
                    raise TypeError(f"all sets must share one dtype and device: sets[0] is {reference.dtype} on "
                                    f"{reference.device}, sets[{index}] is {item.dtype} on {item.device}")
            self.tensor, self.items = None, list(sets)
            self.lengths = torch.tensor([item.shape[0] for item in sets], dtype=torch.long)
        else:
            raise TypeError(f"sets must be a torch.Tensor, a numpy array, or a list of (T_i, C) tensors or arrays, got "
                            f"{type(sets).__name__}")
        if not reference.dtype.is_floating_point:
            raise TypeError(f"descriptors must be floating, got {reference.dtype}")
        self.channels = reference.shape[-1]
        self.dtype, self.device = reference.dtype, reference.device
        for chunk, padded, _ in self.chunks(self.max_length * self.channels, progress=False):
            check_finite(padded, lambda bad: f"sets {bad} (indices) hold NaN or Inf descriptors; clean or drop those "
                                             "sets", offset=chunk.start)

    def as_input_type(self, result: Tensor):
        """result as the sets were given: a numpy array for numpy input, the tensor otherwise."""
        return result.cpu().numpy() if self.from_numpy else result

    @property
    def num_sets(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.num_sets else 0

    def chunks(self, elements_per_set: int, progress: Optional[bool] = None
               ) -> Iterator[Tuple[slice, Tensor, Tensor]]:
        """(sets slice, padded (n, T, C) descriptors with zero rows after each set's end, lengths (n,))."""
        step = max(1, CHUNK_ELEMENTS // max(elements_per_set, 1))
        starts = range(0, self.num_sets, step)
        disable = True if len(starts) < 2 else progress_disabled(progress)
        for start in tqdm(starts, desc="encoding", disable=disable, leave=False):
            chunk = slice(start, min(start + step, self.num_sets))
            lengths = self.lengths[chunk].to(self.device)
            if self.tensor is not None:
                padded = self.tensor[chunk]
            else:
                padded = torch.nn.utils.rnn.pad_sequence(self.items[chunk], batch_first=True)
            yield chunk, padded, lengths

    def sample(self, max_count: int, generator: torch.Generator) -> Tensor:
        """(M, C) descriptors drawn without replacement from all sets (all of them when there are at
        most max_count), without materialising the whole collection."""
        total = int(self.lengths.sum())
        if total <= max_count:
            picks = torch.arange(total)
        else:
            picks = torch.randperm(total, generator=generator)[:max_count].sort().values
        if self.tensor is not None:
            set_size = self.tensor.shape[1]
            rows = self.tensor[(picks // set_size).to(self.device), (picks % set_size).to(self.device)]
        else:
            ends = self.lengths.cumsum(0)
            owners = torch.searchsorted(ends, picks, right=True)
            offsets = picks - (ends - self.lengths)[owners]
            per_set = offsets.split(torch.bincount(owners, minlength=self.num_sets).tolist())
            rows = torch.cat([item[rows.to(self.device)] for item, rows in zip(self.items, per_set)])
        return rows


def row_slices(num_rows: int, row_width: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(row_width, 1))
    return (slice(start, start + step) for start in range(0, num_rows, step))
