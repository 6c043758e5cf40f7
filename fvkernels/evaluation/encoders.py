"""The baselines FV-VAE is compared with (paper §5.3, Table 2), as set encoders in scikit-learn style.

Each encoder maps a descriptor set (the H·W positions of a conv map, or any T descriptors of dimension
C) to one vector of `.dim` entries:

| encoder          | what                                               | dim            |
|------------------|----------------------------------------------------|----------------|
| AverageEncoder   | AVE: mean of the descriptors                       | C              |
| ConcatEncoder    | Concatenation of the T descriptors (fixed T)       | T·C            |
| GMMFisherEncoder | FV of a diagonal GMM, as VLFeat's vl_fisher        | 2·K·C          |
| VLADEncoder      | VLAD on k-means centres, intra-normalised          | K·C            |
| BilinearEncoder  | BP: mean outer product xᵀx / T                     | C² or C(C+1)/2 |

Sets are given as an (N, T, C) tensor, (N, C, H, W) feature maps (T = H·W, like fv_vae_encode), or a
list of (T_i, C) tensors of different lengths. `fit(sets)` learns what the encoder needs (the GMM,
the k-means centres, or only C), `transform(sets)` returns (N, dim) on the sets' device and dtype.
Everything runs as GEMMs in torch over chunks of sets (posteriors (T×K) times descriptors (T×C)), so
it runs on the GPU when the sets are there and never holds an N×T×K×C tensor. Fits are deterministic
for a given `seed`.

Nothing non-finite passes: sets holding NaN or ±Inf are refused by fit and transform (naming the sets), and a fit
or an encoding that overflows on finite sets raises, naming the fitted tensor or the sets, instead of returning it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from torch import Tensor

from fvkernels.common.checks import check_finite
from fvkernels.common.tensors import improved_normalisation, l2_normalize, length_mask
from fvkernels.evaluation.clustering import DiagonalGMM, fit_gmm, kmeans, squared_distances
from fvkernels.evaluation.features import NotFitted, check_fit_finite, class_indices
from fvkernels.evaluation.sets import DEFAULT_FIT_DESCRIPTORS, DescriptorSets, SetsLike
from fvkernels.nn import FVVAE
from fvkernels.pipeline import fv_vae_encode
from fvkernels.training import SetData, train


def check_count(name: str, value) -> None:
    whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or value < 1:
        raise ValueError(f"{name} must be a whole number ≥ 1, got {value!r}")



# GMMFisherEncoder's compute_dtype (a name, as scikit-learn parameters are plain values); None: the sets' dtype.
COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32, None: None}
# VLFeat's vl_fisher skips posteriors below this, and components whose prior is below it (their
# 1/sqrt(prior) factor would blow up any descriptor that lands there).
POSTERIOR_FLOOR = 1e-6


class SetEncoder(TransformerMixin, BaseEstimator):
    """Base of the set encoders, scikit-learn transformers of sets: fit(sets, y=None) → self, transform(sets) →
    (N, dim), fit_transform(sets, y=None). The constructor's arguments are the parameters (get_params, set_params,
    clone, Pipeline, GridSearchCV); what fit learns ends in "_". Sets come as a torch tensor (the result is a tensor
    on its device and dtype) or a numpy array (the result is a numpy array), or a list of either."""

    # Whether _encode already refuses an encoding that overflowed (then transform does not read it again).
    encoding_checked = False
    # What to do when fit or transform overflows on finite sets.
    overflow_advice = "rescale the descriptors (e.g. divide them by their largest magnitude) or give them as float64"

    @property
    def dim(self) -> int:
        """Length of the vector each set is encoded to."""
        self._check_fitted()
        return self._dim()

    def fit(self, sets: SetsLike, y=None) -> "SetEncoder":
        self._check_parameters()
        data = DescriptorSets(sets)
        self._fit(data, y)
        self.channels_ = data.channels
        check_fit_finite(self, self.overflow_advice)
        return self

    def transform(self, sets: SetsLike):
        self._check_fitted()
        data = DescriptorSets(sets)
        if data.channels != self.channels_:
            raise ValueError(f"sets have descriptors of C = {data.channels} but {type(self).__name__} was fitted "
                             f"on C = {self.channels_}")
        self._check_lengths(data)
        out = torch.empty((data.num_sets, self._dim()), dtype=data.dtype, device=data.device)
        for chunk, padded, lengths in data.chunks(self._elements_per_set(data.max_length), self.progress):
            out[chunk] = self._encode(padded, lengths)
            if self.encoding_checked:
                continue
            check_finite(out[chunk], lambda bad: f"{type(self).__name__} encoded sets {bad} (indices) to NaN or Inf "
                                                 f"although their descriptors are finite: the encoding overflowed "
                                                 f"{out.dtype}; {self.overflow_advice}", offset=chunk.start)
        return data.as_input_type(out)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # each sample is a set of descriptors: (N, T, C) or a list of (T_i, C)
        tags.input_tags.three_d_array = True
        return tags

    def _check_fitted(self) -> None:
        if not hasattr(self, "channels_"):
            raise NotFitted(f"{type(self).__name__} is not fitted yet; call fit(sets) first")

    def _check_parameters(self) -> None:
        """Encoders with parameters to check override this (scikit-learn checks them in fit, not __init__)."""

    def _check_lengths(self, data: DescriptorSets) -> None:
        """Encoders that need a fixed set size override this."""

    def _fit(self, data: DescriptorSets, y) -> None:
        """Encoders that learn something from the sets (and, FV-VAE, their labels y) override this."""

    def _dim(self) -> int:
        raise NotImplementedError

    def _elements_per_set(self, set_size: int) -> int:
        raise NotImplementedError

    def _encode(self, padded: Tensor, lengths: Tensor) -> Tensor:
        """(n, T, C) padded descriptors and (n,) lengths → (n, dim)."""
        raise NotImplementedError


class AverageEncoder(SetEncoder):
    """AVE: the mean of each set's descriptors (an empty set gives zeros). dim = C."""

    def __init__(self, *, progress: Optional[bool] = None):
        self.progress = progress

    def _dim(self) -> int:
        return self.channels_

    def _elements_per_set(self, set_size: int) -> int:
        return set_size * self.channels_

    def _encode(self, padded: Tensor, lengths: Tensor) -> Tensor:
        valid = length_mask(lengths, padded.shape[1]).to(padded.dtype)
        return torch.bmm(valid[:, None, :], padded)[:, 0] / lengths.clamp_min(1)[:, None].to(padded.dtype)


class ConcatEncoder(SetEncoder):
    """Concatenation of the T descriptors of each set (all sets must have the T seen in fit), position
    by position: out[n, t·C + c] = x[n, t, c]. dim = T·C (25088 for VGG pool5's 7×7×512)."""

    def __init__(self, *, progress: Optional[bool] = None):
        self.progress = progress

    def _fit(self, data: DescriptorSets, y) -> None:
        self.set_size_ = self._common_length(data)

    @staticmethod
    def _common_length(data: DescriptorSets) -> int:
        sizes = data.lengths.unique()
        if sizes.numel() != 1:
            raise ValueError(f"ConcatEncoder needs sets of one size T, got sizes {sizes.tolist()[:10]}")
        return int(sizes[0])

    def _check_lengths(self, data: DescriptorSets) -> None:
        size = self._common_length(data)
        if size != self.set_size_:
            raise ValueError(f"sets have T = {size} descriptors but ConcatEncoder was fitted on T = {self.set_size_}")

    def _dim(self) -> int:
        return self.set_size_ * self.channels_

    def _elements_per_set(self, set_size: int) -> int:
        return set_size * self.channels_

    def _encode(self, padded: Tensor, lengths: Tensor) -> Tensor:
        return padded.reshape(padded.shape[0], -1)


class GMMFisherEncoder(SetEncoder):
    """Fisher vector of a diagonal GMM with K components, as VLFeat's vl_fisher computes it.

    With posteriors q_tk (those below 1e-6 dropped, like VLFeat) of the T descriptors of a set:
        u_k = 1/(T·sqrt(w_k))   Σ_t q_tk (x_t − µ_k)/σ_k
        v_k = 1/(T·sqrt(2·w_k)) Σ_t q_tk [((x_t − µ_k)/σ_k)² − 1]
    laid out [u_1 … u_K, v_1 … v_K] (dim = 2·K·C), then with normalize=True the "improved" FV: signed
    square root and L2 (VLFeat's Improved flag). Components with prior < 1e-6 contribute zeros.

    fit(sets) runs EM (`fit_gmm`) on at most max_fit_descriptors descriptors sampled with `seed`;
    `from_gmm(gmm)` uses a given GMM instead (e.g. one trained by VLFeat). After fit: gmm_ (DiagonalGMM),
    log_likelihoods_ (mean log-likelihood per EM iteration).

    compute_dtype: "float64", "float32" or None, the dtype of the fit and of the posteriors and statistics (the
    output has the sets' dtype). The GEMM form expands (x − µ)²/σ² into x²/σ² − 2xµ/σ² + µ²/σ², which cancels in float32
    when a component's variance is small next to its distance from the origin — common on post-ReLU
    activations, where components fit the zeros with floored variances: there float32 is off by
    percents of the largest FV entry, float64 agrees with VLFeat to rounding. float64 GEMMs cost about
    twice float32 on CPUs; None computes in the sets' own dtype (for GPUs with slow float64).
    """

    overflow_advice = "rescale the descriptors or compute in float64 (compute_dtype='float64')"

    def __init__(self, num_components: int = 16, *, normalize: bool = True, max_iterations: int = 100,
                 tolerance: float = 1e-6, variance_floor: float = 1e-4,
                 max_fit_descriptors: int = DEFAULT_FIT_DESCRIPTORS, seed: int = 0,
                 compute_dtype: Optional[str] = "float64", progress: Optional[bool] = None):
        self.num_components = num_components
        self.normalize, self.compute_dtype = normalize, compute_dtype
        self.max_iterations, self.tolerance, self.variance_floor = max_iterations, tolerance, variance_floor
        self.max_fit_descriptors, self.seed, self.progress = max_fit_descriptors, seed, progress

    def _check_parameters(self) -> None:
        check_count("num_components", self.num_components)
        if self.compute_dtype not in COMPUTE_DTYPES and self.compute_dtype not in COMPUTE_DTYPES.values():
            raise ValueError(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")

    def _computed_in(self, dtype: torch.dtype) -> torch.dtype:
        chosen = self.compute_dtype if isinstance(self.compute_dtype, torch.dtype) else COMPUTE_DTYPES[self.compute_dtype]
        return chosen or dtype

    @classmethod
    def from_gmm(cls, gmm: DiagonalGMM, *, normalize: bool = True,
                 compute_dtype: Optional[str] = "float64", progress: Optional[bool] = None) -> "GMMFisherEncoder":
        encoder = cls(gmm.num_components, normalize=normalize, compute_dtype=compute_dtype, progress=progress)
        encoder.gmm_, encoder.channels_ = gmm, gmm.channels
        return encoder

    def _fit(self, data: DescriptorSets, y) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        sample = data.sample(self.max_fit_descriptors, generator)
        if sample.shape[0] < int(self.num_components):
            raise ValueError(f"{sample.shape[0]} descriptors cannot fit {int(self.num_components)} GMM components")
        self.gmm_, self.log_likelihoods_ = fit_gmm(
            sample.to(self._computed_in(sample.dtype)), int(self.num_components), max_iterations=self.max_iterations, tolerance=self.tolerance,
            variance_floor=self.variance_floor, seed=self.seed, progress=self.progress)

    def _dim(self) -> int:
        return 2 * int(self.num_components) * self.channels_

    def _elements_per_set(self, set_size: int) -> int:
        # a float64 copy counts twice against the float32 budget of the chunk
        return 2 * (set_size * (int(self.num_components) + 3 * self.channels_) + 3 * int(self.num_components) * self.channels_)

    def _encode(self, sets: Tensor, lengths: Tensor) -> Tensor:
        padded = sets.to(self._computed_in(sets.dtype))
        gmm = self.gmm_.to(device=padded.device, dtype=padded.dtype)
        num_sets, set_size, channels = padded.shape
        posteriors = gmm.log_joint(padded.reshape(-1, channels)).softmax(1).view(num_sets, set_size, -1)
        keep = (posteriors >= POSTERIOR_FLOOR) & length_mask(lengths, padded.shape[1])[..., None] \
            & (gmm.priors >= POSTERIOR_FLOOR)
        posteriors = posteriors * keep
        # Statistics about the mean of the means, for the same reason as in DiagonalGMM.log_joint.
        origin = gmm.means.mean(0)
        centred = padded - origin
        means = gmm.means - origin
        mass = posteriors.sum(1)[..., None]                                   # (n, K, 1)
        first = torch.bmm(posteriors.transpose(1, 2), centred)                # (n, K, C)
        second = torch.bmm(posteriors.transpose(1, 2), centred.square())      # (n, K, C)
        deviation = first - mass * means                                      # Σ q (x − µ)
        squared_deviation = second - 2 * means * first + mass * means.square()  # Σ q (x − µ)²
        counts = lengths.clamp_min(1).to(padded.dtype)[:, None, None]
        weights = gmm.priors.clamp_min(POSTERIOR_FLOOR)[:, None]
        u = deviation / (gmm.variances.sqrt() * counts * weights.sqrt())
        v = (squared_deviation / gmm.variances - mass) / (counts * (2 * weights).sqrt())
        fv = torch.cat([u.flatten(1), v.flatten(1)], 1)
        return (improved_normalisation(fv) if self.normalize else fv).to(sets.dtype)


class VLADEncoder(SetEncoder):
    """VLAD (Jégou et al. 2010) on K k-means centres: for each centre the sum of the residuals x_t − c_k
    of the descriptors nearest to it, then with intra_normalization each centre's block L2-normalised
    (Arandjelović & Zisserman 2013), then with normalize signed square root and L2 of the whole vector.
    Layout centre-major: out[n, k·C + c]; dim = K·C.

    fit(sets) runs k-means (`kmeans`) on at most max_fit_descriptors sampled descriptors. After fit:
    centers_ (K, C), inertias_ (mean squared distance per iteration).
    """

    def __init__(self, num_clusters: int = 32, intra_normalization: bool = True, *, normalize: bool = True,
                 max_iterations: int = 100, tolerance: float = 1e-4,
                 max_fit_descriptors: int = DEFAULT_FIT_DESCRIPTORS, seed: int = 0, progress: Optional[bool] = None):
        self.num_clusters = num_clusters
        self.intra_normalization, self.normalize = intra_normalization, normalize
        self.max_iterations, self.tolerance = max_iterations, tolerance
        self.max_fit_descriptors, self.seed, self.progress = max_fit_descriptors, seed, progress

    def _check_parameters(self) -> None:
        check_count("num_clusters", self.num_clusters)

    def _fit(self, data: DescriptorSets, y) -> None:
        sample = data.sample(self.max_fit_descriptors, torch.Generator().manual_seed(self.seed))
        if sample.shape[0] < int(self.num_clusters):
            raise ValueError(f"{sample.shape[0]} descriptors cannot make {int(self.num_clusters)} k-means clusters")
        self.centers_, self.inertias_ = kmeans(sample, int(self.num_clusters), max_iterations=self.max_iterations,
                                               tolerance=self.tolerance, seed=self.seed, progress=self.progress)

    def _dim(self) -> int:
        return int(self.num_clusters) * self.channels_

    def _elements_per_set(self, set_size: int) -> int:
        return set_size * (2 * int(self.num_clusters) + self.channels_) + 2 * int(self.num_clusters) * self.channels_

    def _encode(self, padded: Tensor, lengths: Tensor) -> Tensor:
        centers = self.centers_.to(device=padded.device, dtype=padded.dtype)
        num_sets, set_size, channels = padded.shape
        flat = padded.reshape(-1, channels)
        squared_norms = flat.square().sum(1)
        nearest = squared_distances(flat, squared_norms, centers).argmin(1).view(num_sets, set_size)
        assignments = torch.nn.functional.one_hot(nearest, int(self.num_clusters)).to(padded.dtype)
        assignments *= length_mask(lengths, padded.shape[1])[..., None]
        sums = torch.bmm(assignments.transpose(1, 2), padded)                  # (n, K, C)
        residuals = sums - assignments.sum(1)[..., None] * centers
        if self.intra_normalization:
            residuals = l2_normalize(residuals, dim=2)
        vlad = residuals.flatten(1)
        # A set whose ‖x‖² overflows has no nearest centre (its distances are Inf − Inf): its code is marked NaN,
        # not left finite and arbitrary, so that transform refuses it by name.
        overflowed = ~torch.isfinite(squared_norms.view(num_sets, set_size).sum(1, keepdim=True))
        vlad = vlad.masked_fill(overflowed, float("nan"))
        return improved_normalisation(vlad) if self.normalize else vlad


class BilinearEncoder(SetEncoder):
    """Bilinear pooling (Lin et al. 2015) of a set with itself: B = Σ_t x_t x_tᵀ / T, then with
    normalize signed square root and L2. dim = C² (full=True, row-major B; the paper's 262144 for C=512)
    or C(C+1)/2 (full=False: the upper triangle row by row, off-diagonal entries × √2 after the square
    root, so that inner products and norms equal those of the full vector)."""

    def __init__(self, full: bool = True, *, normalize: bool = True, progress: Optional[bool] = None):
        self.full, self.normalize, self.progress = full, normalize, progress

    def _dim(self) -> int:
        channels = self.channels_
        return channels * channels if self.full else channels * (channels + 1) // 2

    def _elements_per_set(self, set_size: int) -> int:
        return set_size * self.channels_ + 3 * self.channels_ * self.channels_

    def _encode(self, padded: Tensor, lengths: Tensor) -> Tensor:
        valid = padded * length_mask(lengths, padded.shape[1])[..., None]
        pooled = torch.bmm(valid.transpose(1, 2), valid) / lengths.clamp_min(1).to(padded.dtype)[:, None, None]
        if not self.full:
            rows, cols = torch.triu_indices(self.channels_, self.channels_, device=padded.device)
            # An off-diagonal entry stands for two of the full vector: ×√2 after the signed √ is ×2 under it.
            off_diagonal = 2.0 if self.normalize else math.sqrt(2.0)
            weight = torch.full(rows.shape, off_diagonal, dtype=padded.dtype, device=padded.device)
            pooled = pooled[:, rows, cols] * weight.masked_fill_(rows == cols, 1.0)
        flat = pooled.flatten(1)
        return improved_normalisation(flat) if self.normalize else flat


class FVVAEEncoder(SetEncoder):
    """FV-VAE as a set encoder: fit(sets, y) trains an FVVAE layer (Algorithm 1; y, the sets' class indices, feeds
    the classification loss) and fits its diagonal Fisher on the same sets; transform gives the improved Fisher
    vectors, dim = C·(d+1). lambda_cls=0, or no y, is FV-VAE⁻.

    scaling: "fisher" (default) scales each dimension by the layer's diagonal Fisher (paper Eq. 9);
    "dataset" instead divides each dimension of the raw vectors by its L2 norm over the training sets (the official
    release's `normalize_raw_fv.m`, fitted in fit: dataset_scale_); either is followed by the improved
    normalisation (signed square root, L2). Fitted on the same sets the two agree: the diagonal Fisher is the mean
    of G² over them, so 1/√F and 1/‖G‖ differ by the constant √N that the L2 normalisation removes; they differ
    only where the Fisher's floor acts (tests/test_compression.py).

    The layer's options (latent_dim, hidden, lambda_cls, prenorm, norm_scale, dropout, sigma_floor, backend) are
    fvkernels.nn.FVVAE's, the training's (iterations, batch_size, lr, seed) fvkernels.training.train's; seed also
    draws the layer's initial weights, so a fit is repeatable. y may hold any class labels. After fit: model_ (the
    layer), history_ (the loss per step), classes_ (the labels, when y was used).
    """

    overflow_advice = ("pre-normalise the descriptors (prenorm='descriptor') or rescale them, or train with a lower "
                       "lr if the training diverged")
    # fv_vae_encode refuses a result that overflowed, naming the sets, from its kernels' row sums: no second pass
    # over the C·(d+1)-dimensional vectors.
    encoding_checked = True

    def __init__(self, latent_dim: int = 256, hidden: Sequence[int] = (512,), *, lambda_cls: Optional[float] = None,
                 prenorm: Optional[str] = "descriptor", norm_scale: Optional[float] = None, dropout: float = 0.5,
                 sigma_floor: float = 0.05, iterations: int = 5000, batch_size: int = 128, lr: float = 1.0,
                 seed: int = 0, backend: str = "auto", scaling: str = "fisher", progress: Optional[bool] = None):
        self.latent_dim, self.hidden, self.lambda_cls = latent_dim, hidden, lambda_cls
        self.scaling = scaling
        self.prenorm, self.norm_scale, self.dropout, self.sigma_floor = prenorm, norm_scale, dropout, sigma_floor
        self.iterations, self.batch_size, self.lr, self.seed = iterations, batch_size, lr, seed
        self.backend, self.progress = backend, progress

    def _fit(self, data: DescriptorSets, y) -> None:
        if self.scaling not in ("fisher", "dataset"):
            raise ValueError(f"scaling must be 'fisher' (the diagonal Fisher) or 'dataset' (each dimension's L2 norm "
                             f"over the training sets), got {self.scaling!r}")
        padded = data.tensor if data.tensor is not None else torch.nn.utils.rnn.pad_sequence(data.items, batch_first=True)
        lengths = None if data.items is None else data.lengths
        labels = None
        if y is not None and self.lambda_cls != 0:
            self.classes_, indices = class_indices(y, data.num_sets, "y")
            labels = torch.from_numpy(indices.astype(np.int64)).to(data.device)
        with torch.random.fork_rng(devices=[]):  # the initial weights from `seed`, the caller's generator untouched
            torch.manual_seed(self.seed)
            self.model_ = FVVAE(data.channels, self.latent_dim, tuple(self.hidden),
                                num_classes=None if labels is None else len(self.classes_),
                                lambda_cls=0.0 if labels is None else self.lambda_cls, prenorm=self.prenorm,
                                norm_scale=self.norm_scale, dropout=self.dropout, sigma_floor=self.sigma_floor,
                                backend=self.backend).to(data.dtype)
        self.history_ = train(self.model_, SetData(padded, labels, lengths), iterations=self.iterations,
                              batch_size=self.batch_size, lr=self.lr, seed=self.seed, progress=self.progress is not False)
        chunks = ((padded_chunk, chunk_lengths) for _, padded_chunk, chunk_lengths in
                  data.chunks(self._fisher_chunk_elements(data.max_length, data.channels)))
        self.model_.fit_fisher(chunks)
        if self.scaling == "dataset":
            squares = torch.zeros(self.model_.dim, dtype=torch.float64, device=data.device)
            for _, padded_chunk, chunk_lengths in data.chunks(self._fisher_chunk_elements(data.max_length,
                                                                                          data.channels)):
                squares += self._raw_vectors(padded_chunk, chunk_lengths).double().square().sum(0)
            norms = squares.sqrt()
            self.dataset_scale_ = torch.where(norms > 0, norms, torch.ones_like(norms)).to(data.dtype)

    @torch.no_grad()
    def _raw_vectors(self, padded: Tensor, lengths: Tensor) -> Tensor:
        """The layer's Fisher vectors without the Fisher scaling and without normalisation, (n, C·(d+1))."""
        params = dataclasses.replace(self.model_.to_params(), fisher=None)
        return fv_vae_encode(padded, params, lengths=lengths, normalize=False, backend=self.model_.backend)

    def _dim(self) -> int:
        return self.model_.dim

    def _elements_per_set(self, set_size: int) -> int:
        return self._fisher_chunk_elements(set_size, self.channels_)

    def _fisher_chunk_elements(self, set_size: int, channels: int) -> int:
        return (set_size + self.latent_dim + 1) * channels  # the set, and its C·(d+1) Fisher vector

    @torch.no_grad()
    def _encode(self, padded: Tensor, lengths: Tensor) -> Tensor:
        if self.scaling == "dataset":
            return improved_normalisation(self._raw_vectors(padded, lengths) / self.dataset_scale_)
        return self.model_(padded, lengths)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = False  # y only adds the classification loss
        return tags
