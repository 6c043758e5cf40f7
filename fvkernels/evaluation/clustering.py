"""Clustering for the classic encoders: k-means (VLAD's centres) and a diagonal Gaussian mixture fitted by EM
(GMM-FV), as GEMMs in torch over bounded row blocks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fvkernels.common.checks import check_finite, check_finite_tensors
from fvkernels.evaluation.sets import progress_disabled, row_slices


def squared_distances(x: Tensor, x_squared_norms: Tensor, centres: Tensor) -> Tensor:
    """(M, K) ‖x − c‖² as a GEMM, clamped at 0 against rounding."""
    return (x_squared_norms[:, None] - 2 * x @ centres.t() + centres.square().sum(1)).clamp_min_(0)


def check_finite_descriptors(descriptors: Tensor) -> None:
    check_finite(descriptors, lambda rows: f"descriptors {rows} (rows) hold NaN or Inf; clean or drop them")


def checked_squared_norms(x: Tensor) -> Tensor:
    """(M,) ‖x‖² of (M, C) finite descriptors, refusing rows whose square overflows the dtype: their distances would
    be Inf − Inf = NaN, and the nearest centre an arbitrary one."""
    squared_norms = x.square().sum(1)
    check_finite(squared_norms, lambda rows: f"descriptors {rows} (rows) have squared norms that overflow {x.dtype} "
                                             f"(> {torch.finfo(x.dtype).max:.3g}); rescale the descriptors or give "
                                             "them as float64")
    return squared_norms


def kmeans_plusplus(descriptors: Tensor, num_clusters: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with probability ∝ its
    squared distance to the nearest centre so far. Returns (K, C) rows of `descriptors`."""
    num_rows = descriptors.shape[0]
    squared_norms = checked_squared_norms(descriptors)
    first = int(torch.randint(num_rows, (1,), generator=generator, device=generator.device))
    centres = [descriptors[first]]
    nearest = squared_distances(descriptors, squared_norms, descriptors[first:first + 1])[:, 0]
    for _ in range(1, num_clusters):
        # All remaining points coincide with centres: any of them will do, as with uniform weights.
        weights = nearest if bool(nearest.sum() > 0) else torch.ones_like(nearest)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        centres.append(descriptors[pick])
        nearest = torch.minimum(nearest, squared_distances(descriptors, squared_norms, descriptors[pick:pick + 1])[:, 0])
    return torch.stack(centres)


def kmeans(descriptors: Tensor, num_clusters: int, *, max_iterations: int = 100, tolerance: float = 1e-4,
           seed: int = 0, progress: Optional[bool] = None) -> Tuple[Tensor, List[float]]:
    """Lloyd's k-means from k-means++ seeds on (M, C) descriptors. Stops when the mean squared distance
    to the nearest centre improves by less than `tolerance` (relative). Returns the (K, C) centres and
    the mean squared distance before each update. A cluster that loses all its points keeps its centre."""
    check_finite_descriptors(descriptors)
    generator = torch.Generator(device=descriptors.device).manual_seed(seed)
    centres = kmeans_plusplus(descriptors, num_clusters, generator)
    squared_norms = checked_squared_norms(descriptors)
    history: List[float] = []
    bar = tqdm(range(max_iterations), desc="k-means", disable=progress_disabled(progress), leave=False)
    for _ in bar:
        sums = torch.zeros_like(centres)
        counts = descriptors.new_zeros(num_clusters)
        inertia = 0.0
        for rows in row_slices(descriptors.shape[0], num_clusters + descriptors.shape[1]):
            distances = squared_distances(descriptors[rows], squared_norms[rows], centres)
            nearest, assignment = distances.min(1)
            inertia += float(nearest.sum())
            sums.index_add_(0, assignment, descriptors[rows])
            counts.index_add_(0, assignment, torch.ones_like(nearest))
        history.append(inertia / descriptors.shape[0])
        bar.set_postfix(inertia=history[-1])
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        if len(history) > 1 and history[-2] - history[-1] <= tolerance * abs(history[-2]):
            break
    return centres, history


# ---- Gaussian mixture ------------------------------------------------------------------------------------

@dataclass
class DiagonalGMM:
    """means (K, C), variances (K, C) (diagonal covariances), priors (K,) summing to 1; all finite, variances
    positive (a GMM given by hand, loaded, or reached by EM is refused otherwise, naming the components)."""

    means: Tensor
    variances: Tensor
    priors: Tensor

    def __post_init__(self):
        if self.means.dim() != 2 or self.variances.shape != self.means.shape:
            raise ValueError(f"means and variances must both be (K, C), got {tuple(self.means.shape)} and "
                             f"{tuple(self.variances.shape)}")
        if self.priors.shape != self.means.shape[:1]:
            raise ValueError(f"priors must be (K,) = ({self.means.shape[0]},), got {tuple(self.priors.shape)}")
        check_finite_tensors({"the GMM's means": self.means, "the GMM's variances": self.variances,
                              "the GMM's priors": self.priors},
                             "a GMM's parameters must be finite: refit it on rescaled descriptors or in float64, or "
                             "reload it")
        if not bool((self.variances > 0).all()):
            components = (self.variances <= 0).any(1).nonzero().flatten()[:10].tolist()
            raise ValueError(f"variances must be positive, but components {components} have variances down to "
                             f"{float(self.variances.min()):.3g}; floor them (fit_gmm's variance_floor) or refit")

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def channels(self) -> int:
        return self.means.shape[1]

    def to(self, *args, **kwargs) -> "DiagonalGMM":
        return DiagonalGMM(self.means.to(*args, **kwargs), self.variances.to(*args, **kwargs),
                           self.priors.to(*args, **kwargs))

    def log_joint(self, x: Tensor) -> Tensor:
        """(M, K) log(prior_k · N(x | mean_k, diag(variance_k))) of (M, C) descriptors, as GEMMs.

        Distances are taken about the mean of the means, which keeps the expanded square
        x²/σ² − 2xµ/σ² + µ²/σ² from cancelling catastrophically on data far from the origin."""
        origin = self.means.mean(0)
        x = x - origin
        means = self.means - origin
        precision = self.variances.reciprocal()
        mahalanobis = x.square() @ precision.t() - 2 * x @ (means * precision).t() + (means.square() * precision).sum(1)
        log_normaliser = self.variances.log().sum(1) + self.channels * math.log(2 * math.pi)
        return self.priors.log() - 0.5 * (mahalanobis + log_normaliser)


def fit_gmm(descriptors: Tensor, num_components: int, *, max_iterations: int = 100, tolerance: float = 1e-6,
            variance_floor: float = 1e-4, seed: int = 0, progress: Optional[bool] = None
            ) -> Tuple[DiagonalGMM, List[float]]:
    """Diagonal GMM fitted by EM on (M, C) descriptors, from k-means++ means, the data variance and
    uniform priors. Variances are kept ≥ variance_floor × the largest per-dimension data variance
    (VLFeat's default bound), so dead channels (constant zero after a ReLU) do not collapse a component.
    Stops when the mean log-likelihood per descriptor improves by less than `tolerance` (relative).
    Returns the GMM and the mean log-likelihood before each M-step (non-decreasing: EM).

    A component that loses all responsibility keeps its mean and variance with a prior of ~0.
    """
    num_rows, channels = descriptors.shape
    check_finite_descriptors(descriptors)
    data_variance = descriptors.var(0, unbiased=False)
    largest_variance = float(data_variance.max())
    if not math.isfinite(largest_variance):
        raise ValueError(f"the descriptors' variance overflows {descriptors.dtype} (values up to "
                         f"{float(descriptors.abs().max()):.3g}); divide them by a constant or fit in float64")
    if largest_variance == 0:
        spread = float((descriptors.amax(0) - descriptors.amin(0)).max())
        if spread == 0:
            raise ValueError("all descriptors are identical; a GMM cannot be fitted to them")
        raise ValueError(f"the descriptors' variance underflows {descriptors.dtype} (they differ by at most "
                         f"{spread:.3g}); multiply them by a constant or fit in float64")
    floor = variance_floor * data_variance.max()
    generator = torch.Generator(device=descriptors.device).manual_seed(seed)
    gmm = DiagonalGMM(kmeans_plusplus(descriptors, num_components, generator),
                      data_variance.clamp_min(floor).expand(num_components, channels).clone(),
                      descriptors.new_full((num_components,), 1.0 / num_components))
    # Sufficient statistics about the data mean, so that E[x²] − E[x]² does not cancel.
    shift = descriptors.mean(0)
    history: List[float] = []
    bar = tqdm(range(max_iterations), desc="GMM EM", disable=progress_disabled(progress), leave=False)
    for _ in bar:
        mass = descriptors.new_zeros(num_components)
        first = descriptors.new_zeros(num_components, channels)
        second = descriptors.new_zeros(num_components, channels)
        log_likelihood = 0.0
        for rows in row_slices(num_rows, num_components + channels):
            log_joint = gmm.log_joint(descriptors[rows])
            log_evidence = log_joint.logsumexp(1)
            log_likelihood += float(log_evidence.sum())
            posteriors = (log_joint - log_evidence[:, None]).exp_()
            centred = descriptors[rows] - shift
            mass += posteriors.sum(0)
            first += posteriors.t() @ centred
            second += posteriors.t() @ centred.square()
        history.append(log_likelihood / num_rows)
        bar.set_postfix(log_likelihood=history[-1])
        alive = mass > 0
        mean_offsets = first[alive] / mass[alive, None]
        means, variances = gmm.means.clone(), gmm.variances.clone()
        means[alive] = mean_offsets + shift
        variances[alive] = (second[alive] / mass[alive, None] - mean_offsets.square()).clamp_min(floor)
        gmm = DiagonalGMM(means, variances, mass / num_rows)
        if len(history) > 1 and history[-1] - history[-2] <= tolerance * abs(history[-2]):
            break
    return gmm, history
