"""The problem sizes of the benchmarks, their random inputs, and their FLOP and byte counts.

Every case exists at full size (`pytest bench/ --benchmark`) and shrunk (`Case.smoke`, plain `pytest bench/`),
so that the smoke run goes through exactly the code of the full run in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from fvkernels import FVVAEParams

SEED = 0


@dataclass(frozen=True)
class Case:
    """N descriptor sets of T descriptors in C channels, latent size d."""

    key: str  # stable name: the report's targets and the JSON refer to it
    label: str  # what the size stands for in practice
    sets: int  # N
    set_size: int  # T
    channels: int  # C
    latent: int = 256  # d
    ragged: bool = False  # set lengths drawn in [T/2, T] (the first set full)
    scaling: bool = False  # a point of the throughput-vs-T plot (C=512, d=256, ≈12.8k descriptors per call)
    # or "fv_accumulate_train" (forward + backward), "fv_vae_encode" (the pipeline), "pixels_to_fv" and
    # "fine_tune_step" (USER_CASES)
    operation: str = "fv_accumulate"

    @property
    def group(self) -> str:
        ragged = ", ragged lengths" if self.ragged else ""
        sizes = f"N={self.sets} T={self.set_size} C={self.channels} d={self.latent}"
        return f"{self.operation}, {self.label}: {sizes}{ragged}"

    def smoke(self) -> "Case":
        """The same case shrunk for the smoke run: two sets of T/50 descriptors, C/32 channels, d/32 latents."""
        return replace(self, sets=2, set_size=max(2, self.set_size // 50), channels=self.channels // 32,
                       latent=self.latent // 32)


# Video frames are 50 SPP cells each (DESIGN §1.2); C=2048 gets a smaller batch so that a 2-core CPU's run stays
# within minutes. The T sweep keeps ≈12.8k descriptors per call: with frames-c512 and images it spans T = 16…3136.
FV_ACCUMULATE_CASES = (
    Case("frames-c512", "video frames (50 SPP cells)", 256, 50, 512, scaling=True),
    Case("frames-c2048", "video frames (50 SPP cells)", 64, 50, 2048),
    Case("images", "images (28x28 maps)", 16, 784, 512, scaling=True),
    Case("videos", "whole videos (25 frames x 50 cells)", 8, 1250, 512, ragged=True),
    Case("sweep-t16", "T sweep", 800, 16, 512, scaling=True),
    Case("sweep-t196", "T sweep", 64, 196, 512, scaling=True),
    Case("sweep-t3136", "T sweep", 4, 3136, 512, scaling=True),
)

# A training step through the layer (forward + backward w.r.t. z, x, W, b, σx⁻²): the sizes fine-tuning meets.
TRAINING_CASES = (
    Case("train-t196", "training step, forward + backward (14x14 maps)", 64, 196, 512, operation="fv_accumulate_train"),
    Case("train-frames", "training step, forward + backward (video frames)", 256, 50, 512,
         operation="fv_accumulate_train"),
)

# What a user feels (issue 12): pixels to Fisher vectors through EfficientNet-Lite0's head (224² images → 7×7
# maps of 1280 channels → 1280·257-dimensional vectors), and one fine-tuning step of the backbone's top block
# (block15 and the head) with the layer and a linear classifier on its normalised Fisher vectors.
USER_CASES = (
    Case("pixels-to-fv", "images/s, EfficientNet-Lite0 224² → head (7×7×1280) → fv_vae_encode", 16, 49, 1280,
         operation="pixels_to_fv"),
    Case("fine-tune-step", "fine-tuning step: block15 + head + FVVAE + linear classifier, forward + backward", 16, 49,
         1280, operation="fine_tune_step"),
)

# The full pipeline on images: a 512→512→256 encoder (C=512, d=256) → C·(d+1) = 131584-d Fisher vectors.
PIPELINE_CASE = Case("pipeline-images", "images (28x28 maps)", 16, 784, 512, operation="fv_vae_encode")


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def set_lengths(case: Case, generator: torch.Generator) -> Optional[Tensor]:
    if not case.ragged:
        return None
    lengths = torch.randint(case.set_size // 2, case.set_size + 1, (case.sets,), generator=generator)
    lengths[0] = case.set_size
    return lengths


def fv_accumulate_inputs(case: Case, device: str, dtype: torch.dtype) -> Tuple:
    """(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths) with about half the decoder units active."""
    generator = _generator()
    shape = (case.sets, case.set_size)
    z = torch.randn(*shape, case.latent, generator=generator)
    x = torch.rand(*shape, case.channels, generator=generator)  # non-negative, as post-ReLU CNN descriptors are
    dec_weight = torch.randn(case.channels, case.latent, generator=generator) / case.latent ** 0.5
    dec_bias = torch.randn(case.channels, generator=generator) * 0.5
    inv_sigma2 = torch.rand(case.channels, generator=generator) + 0.5
    fisher_rsqrt = torch.rand(case.channels, case.latent + 1, generator=generator) + 0.5
    redraw_near_ties(z, dec_weight, dec_bias, generator)
    floats = [t.to(device, dtype) for t in (z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt)]
    lengths = set_lengths(case, generator)
    return (*floats, None if lengths is None else lengths.to(device))


# Pre-activations closer to 0 than this are redrawn (see redraw_near_ties).
TIE_MARGIN = 1e-4


def redraw_near_ties(z: Tensor, dec_weight: Tensor, dec_bias: Tensor, generator: torch.Generator) -> None:
    """Redraws, in place, the latent vectors any of whose decoder pre-activations z·wᵀ + b lie within TIE_MARGIN
    of 0. There the ReLU's side is decided by rounding: two correct float32 implementations that sum in another
    order may put that unit on different sides and differ by O(1) in its terms (at full size the images case had
    45 such units, the closest 1.3·10⁻⁷ from 0), which would read as an error of the provider."""
    for _ in range(100):
        pre = torch.baddbmm(dec_bias.double().expand(z.shape[0], 1, -1), z.double(),
                            dec_weight.double().t().expand(z.shape[0], -1, -1))
        near = (pre.abs() < TIE_MARGIN).any(-1)
        if not near.any():
            return
        z[near] = torch.randn(int(near.sum()), z.shape[2], generator=generator)
    raise RuntimeError("could not draw latents away from the decoder's ReLU ties; lower TIE_MARGIN")


def pipeline_inputs(case: Case, device: str, dtype: torch.dtype) -> Tuple[Tensor, FVVAEParams]:
    """(N, T, C) post-ReLU descriptor sets and a C→C→d FV-VAE with descriptor prenorm and a Fisher diagonal."""
    generator = _generator()
    channels, latent = case.channels, case.latent
    descriptors = torch.randn(case.sets, case.set_size, channels, generator=generator).relu_()
    widths = (channels, channels, latent)
    encoder = [(torch.randn(out, inp, generator=generator) / inp ** 0.5, torch.randn(out, generator=generator) * 0.1,
                index == 0) for index, (inp, out) in enumerate(zip(widths[:-1], widths[1:]))]
    params = FVVAEParams(encoder, torch.randn(channels, latent, generator=generator) / latent ** 0.5,
                         torch.randn(channels, generator=generator) * 0.1,
                         torch.rand(channels, generator=generator) + 0.5,
                         torch.rand(channels, latent + 1, generator=generator) + 0.1)
    return descriptors.to(device, dtype), params.to(device, dtype)


def vlfeat_gmm(case: Case) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(means, variances, priors) of a diagonal GMM over the case's descriptors giving VLFeat's improved FV the
    same dimension: 2·K·D = 2·(d/2)·C ≈ C·(d+1) (131072 against 131584 for C=512, d=256).

    Means are descriptors drawn like the benchmark's, variances the data's per-dimension variance, priors
    uniform: what k-means-seeded EM starts from, with the same soft-assignment sparsity a fitted GMM has.
    """
    components = case.latent // 2
    generator = _generator().manual_seed(SEED + 1)
    sample = torch.randn(max(4 * components, 64), case.channels, generator=generator).relu_()
    means = sample[:components].numpy()
    variances = np.tile(sample.var(0).clamp_min(1e-6).numpy(), (components, 1))
    priors = np.full(components, 1.0 / components, dtype=np.float32)
    return means, variances, priors


def valid_descriptors(case: Case, lengths: Optional[Tensor]) -> int:
    """Descriptors that count as work: the valid ones of ragged sets."""
    return int(lengths.sum()) if lengths is not None else case.sets * case.set_size


def fv_accumulate_flops(case: Case, descriptors: int) -> int:
    """Decoder GEMM 2·C·d plus outer product 2·C·(d+1) per descriptor (DESIGN §1)."""
    return descriptors * (2 * case.channels * case.latent + 2 * case.channels * (case.latent + 1))


def training_flops(case: Case, descriptors: int) -> int:
    """The forward's two GEMMs and the backward's four (∂L/∂r, ∂z twice, ∂W): three times the forward. A kernel
    that recomputes the decoder tile does one GEMM more than this counts."""
    return 3 * fv_accumulate_flops(case, descriptors)


def pipeline_flops(case: Case, params: FVVAEParams, descriptors: int) -> int:
    """fv_accumulate's FLOPs plus the encoder's 2·Σ(in·out) per descriptor (DESIGN §1)."""
    encoder = sum(2 * weight.numel() for weight, _, _ in params.encoder)
    return fv_accumulate_flops(case, descriptors) + descriptors * encoder


def tensor_bytes(*tensors: Optional[Tensor]) -> int:
    """Bytes to read the inputs once and write the output once (None entries are absent inputs)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
