"""What the paper does to Fisher vectors after encoding them (§5.4, Fig. 4c; the official release's
`normalize_raw_fv.m`), as scikit-learn transformers on (N, D) feature matrices — torch in, torch out (any device);
numpy in, numpy out:

- `PCACompression(n_components, whiten=False)`: projection on the leading principal components of the training
  vectors (randomised SVD, so D = C·(d+1) in the hundreds of thousands stays cheap), optionally whitened;
- `RandomMaclaurin(n_components, degree=1, seed=0)`: Kar & Karnick's random feature map [15] of the homogeneous
  polynomial kernel (x·y)^degree: each output is a product of `degree` Rademacher projections, scaled so that inner
  products of outputs estimate the kernel without bias (degree 1: a random ±1 projection, what a linear SVM on the
  compressed vectors approximates; degree 2: compact bilinear pooling's map);
- `DatasetNormalization()`: each dimension divided by its L2 norm over the training vectors (the release's
  dataset-level normalisation, an alternative to the Fisher diagonal), fitted on training data, applied to test.

Non-finite features are refused naming the rows (features.as_matrix); transform before fit raises NotFitted.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from torch import Tensor

from fvkernels.common.checks import flag, real_number, whole_number
from fvkernels.evaluation.features import ArrayLike, NotFitted, as_matrix, check_fit_finite

# Below this a dimension's norm over the data set counts as zero: the dimension is left as it is (all zeros).
NORM_FLOOR = 1e-12
# Extra random directions and power iterations of the randomised SVD (Halko et al.): enough for the leading
# components of Fisher vectors to match a full SVD to float32 rounding.
PCA_OVERSAMPLING = 10
PCA_POWER_ITERATIONS = 4


class _MatrixTransformer(TransformerMixin, BaseEstimator):
    """fit(X, y=None) / transform(X) on (N, D) matrices in the input's kind; subclasses learn in _fit and map in
    _transform on float tensors."""

    def fit(self, features: ArrayLike, y=None):
        x = as_matrix(features, "features").detach()
        for count, what in ((x.shape[0], "sample(s)"), (x.shape[1], "feature(s)")):
            if count == 0:
                raise ValueError(f"Found array with 0 {what} (shape={tuple(x.shape)}) while a minimum of 1 is "
                                 f"required to fit {type(self).__name__}.")
        self._check_options(x)
        self.n_features_in_ = x.shape[1]
        self._fit(x)
        check_fit_finite(self, "the features are too large for their dtype; rescale them or give them as float64")
        return self

    def transform(self, features: ArrayLike):
        if not hasattr(self, "n_features_in_"):
            raise NotFitted(f"{type(self).__name__} is not fitted yet; call fit(training_features) first")
        x = as_matrix(features, "features").detach()
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {x.shape[1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input; transform vectors of the encoder it was "
                             "fitted on")
        out = self._transform(x)
        return out.cpu().numpy() if isinstance(features, np.ndarray) else out

    def _check_options(self, x: Tensor) -> None:
        """Refuses options that cannot apply to these training vectors."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


class PCACompression(_MatrixTransformer):
    """Projection of (N, D) vectors on the n_components leading principal directions of the training vectors
    (their mean removed); whiten divides each output by the standard deviation of its component. After fit:
    mean_ (D,), components_ (n_components, D), explained_variance_ (n_components,), n_features_in_."""

    def __init__(self, n_components: int = 256, *, whiten: bool = False, seed: int = 0):
        self.n_components = n_components
        self.whiten = whiten
        self.seed = seed

    def _check_options(self, x: Tensor) -> None:
        flag("whiten", self.whiten)
        whole_number("seed", self.seed, minimum=0)
        components = whole_number("n_components", self.n_components)
        if components > min(x.shape):
            raise ValueError(f"n_components = {components} needs at least that many training vectors and dimensions, "
                             f"got {x.shape[0]} vectors of {x.shape[1]} dimensions")

    def _fit(self, x: Tensor) -> None:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        self.mean_ = x.mean(0)
        centred = x - self.mean_
        components = int(self.n_components)
        rank = min(components + PCA_OVERSAMPLING, *x.shape)
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(int(self.seed))
            _, singular_values, v = torch.svd_lowrank(centred, q=rank, niter=PCA_POWER_ITERATIONS)
        self.components_ = v[:, :components].t().contiguous()
        # A component's sign is arbitrary: the largest-magnitude entry positive, so that refits agree.
        signs = torch.sign(self.components_.gather(1, self.components_.abs().argmax(1, keepdim=True)))
        self.components_ *= torch.where(signs == 0, torch.ones_like(signs), signs)
        self.explained_variance_ = singular_values[:components].square() / max(x.shape[0] - 1, 1)

    def _transform(self, x: Tensor) -> Tensor:
        x = x.to(self.components_.device, self.components_.dtype)
        out = (x - self.mean_) @ self.components_.t()
        if self.whiten:
            out /= self.explained_variance_.sqrt().clamp_min(NORM_FLOOR)
        return out


class RandomMaclaurin(_MatrixTransformer):
    """Random Maclaurin features of the homogeneous polynomial kernel (x·y)^degree (Kar & Karnick 2012): output i
    is Π_j (ω_ij·x) / √n_components with ω_ij i.i.d. Rademacher vectors, so that E[φ(x)·φ(y)] = (x·y)^degree.
    Data-independent: fit only draws the projections (from `seed`) for the training vectors' width. After fit:
    projections_ (degree, D, n_components), n_features_in_."""

    def __init__(self, n_components: int = 4096, *, degree: int = 1, seed: int = 0):
        self.n_components = n_components
        self.degree = degree
        self.seed = seed

    def _check_options(self, x: Tensor) -> None:
        whole_number("n_components", self.n_components)
        whole_number("degree", self.degree)
        whole_number("seed", self.seed, minimum=0)

    def _fit(self, x: Tensor) -> None:
        generator = torch.Generator().manual_seed(int(self.seed))
        signs = torch.randint(0, 2, (int(self.degree), x.shape[1], int(self.n_components)), generator=generator)
        self.projections_ = (signs * 2 - 1).to(x.device, torch.promote_types(x.dtype, torch.float32))

    def _transform(self, x: Tensor) -> Tensor:
        x = x.to(self.projections_.device, self.projections_.dtype)
        out = x @ self.projections_[0]
        for projection in self.projections_[1:]:
            out *= x @ projection
        return out / math.sqrt(int(self.n_components))


class DatasetNormalization(_MatrixTransformer):
    """Each dimension divided by its L2 norm over the training vectors (the official release's
    `normalize_raw_fv.m`); a dimension that is zero on every training vector is left as it is. After fit: scale_
    (D,), the norms (1 for such dimensions), n_features_in_."""

    def __init__(self, scale_floor: Optional[float] = None):
        self.scale_floor = scale_floor

    def _check_options(self, x: Tensor) -> None:
        if self.scale_floor is not None:
            real_number("scale_floor", self.scale_floor, minimum=0)

    def _fit(self, x: Tensor) -> None:
        norms = x.to(torch.promote_types(x.dtype, torch.float32)).norm(dim=0)
        floor = NORM_FLOOR if self.scale_floor is None else max(float(self.scale_floor), NORM_FLOOR)
        self.scale_ = torch.where(norms > floor, norms, torch.ones_like(norms))

    def _transform(self, x: Tensor) -> Tensor:
        return x.to(self.scale_.device, self.scale_.dtype) / self.scale_
