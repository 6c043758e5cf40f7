"""The parameters of a trained FV-VAE (DESIGN §2): what the pipeline needs, checked once when they are made."""
from __future__ import annotations

from dataclasses import InitVar, dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from fvkernels.common.checks import check_finite_tensors, flag, real_number, require, tracing, transformed
from fvkernels.common.tensors import floor_for

PRENORMS = ("descriptor", "map", None)
SPP_MODES = ("official", None)
FISHER_FLOOR = 1e-12

EncoderLayer = Tuple[Tensor, Tensor, bool]


@dataclass(repr=False)
class FVVAEParams:
    """What `fv_vae_encode` needs: the inference MLP, the decoder, σx, and optionally the diagonal Fisher.

    encoder: list of (weight (out, in), bias (out,), relu) applied in order to the descriptors;
    dec_weight (C, d), dec_bias (C,), sigma_x (C,) > 0, fisher (C, d+1) = mean of G² or None;
    prenorm: "descriptor" (each x_t to norm norm_scale), "map" (each set / feature map as one vector,
    the official release) or None; spp: "official" (the release's 50-cell max-pooling pyramid over
    7×7 maps) or None.

    Made with validate=True (the default), the structure (shapes, one dtype and device, the options) and the
    values (σx > 0, which reads the tensors back from a GPU) are checked. validate=False trusts the caller: it is
    for code that guarantees both by construction and builds params on every call (fvkernels.nn.FVVAE's forward,
    whose σx is a clamped exponential).
    """

    encoder: List[EncoderLayer]
    dec_weight: Tensor
    dec_bias: Tensor
    sigma_x: Tensor
    fisher: Optional[Tensor] = None
    prenorm: Optional[str] = "descriptor"
    norm_scale: float = 1.0
    spp: Optional[str] = None
    validate: InitVar[bool] = True
    # (fisher, its version, fisher_rsqrt): see fisher_rsqrt
    _derived_fisher: Optional[Tuple[Tensor, int, Tensor]] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self, validate: bool) -> None:
        self.encoder = [self._encoder_layer(index, layer) for index, layer in enumerate(self.encoder)]
        for name in ("dec_weight", "dec_bias", "sigma_x", "fisher"):
            setattr(self, name, _as_tensor(name, getattr(self, name), optional=name == "fisher"))
        if validate:
            self._check_structure()
            self._check_values()

    @staticmethod
    def _encoder_layer(index: int, layer) -> EncoderLayer:
        where = f"encoder layer {index}"
        if not isinstance(layer, (tuple, list)) or len(layer) != 3:
            got = f"a {type(layer).__name__} of {len(layer)}" if isinstance(layer, (tuple, list)) else \
                type(layer).__name__
            raise ValueError(f"{where} must be a (weight (out, in), bias (out,), relu: bool) triple, got {got}")
        weight, bias, relu = layer
        return _as_tensor(f"{where} weight", weight), _as_tensor(f"{where} bias", bias), flag(f"{where}'s relu", relu)

    @property
    def fisher_rsqrt(self) -> Optional[Tensor]:
        """1/sqrt(max(F, floor)) (DESIGN §1.6), derived from `fisher` on use so that it never goes stale, and kept
        while `fisher` is the same tensor at the same version (an in-place change bumps it) outside autograd,
        tracing and transforms: an encoding loop derives it once instead of allocating it (one set's output) at
        every call."""
        fisher = self.fisher
        if fisher is None:
            return None
        keep = (not tracing() and not transformed() and not (fisher.requires_grad and torch.is_grad_enabled())
                and not fisher.is_inference())
        kept = self._derived_fisher
        if keep and kept is not None and kept[0] is fisher and kept[1] == fisher._version:
            return kept[2]
        derived = fisher.clamp_min(floor_for(fisher.dtype, FISHER_FLOOR)).rsqrt()
        if keep:
            self._derived_fisher = (fisher, fisher._version, derived)
        return derived

    def _check_structure(self) -> None:
        if self.prenorm not in PRENORMS:
            raise ValueError(f"prenorm must be one of {PRENORMS}, got {self.prenorm!r}")
        if self.spp not in SPP_MODES:
            raise ValueError(f"spp must be one of {SPP_MODES}, got {self.spp!r}")
        real_number("norm_scale", self.norm_scale)
        if not self.norm_scale > 0:
            raise ValueError(f"norm_scale must be a finite number > 0, got {self.norm_scale}")
        if not self.encoder:
            raise ValueError("encoder must have at least one (weight, bias, relu) layer")
        if self.dec_weight.dim() != 2:
            raise ValueError(f"dec_weight must have shape (C, d), got {tuple(self.dec_weight.shape)}")
        channels, latent = self.dec_weight.shape
        width = channels
        for index, (weight, bias, _) in enumerate(self.encoder):
            if weight.dim() != 2 or weight.shape[1] != width:
                raise ValueError(f"encoder layer {index} weight must have shape (out, {width}), "
                                 f"got {tuple(weight.shape)}")
            if bias.shape != (weight.shape[0],):
                raise ValueError(f"encoder layer {index} bias must have shape ({weight.shape[0]},), "
                                 f"got {tuple(bias.shape)}")
            width = weight.shape[0]
        if width != latent:
            raise ValueError(f"the encoder ends with {width} features but dec_weight (C, d) = "
                             f"{tuple(self.dec_weight.shape)} expects d = {latent}")
        for name, value in (("dec_bias", self.dec_bias), ("sigma_x", self.sigma_x)):
            if value.shape != (channels,):
                raise ValueError(f"{name} must have shape (C,) = ({channels},), got {tuple(value.shape)}")
        if self.fisher is not None and self.fisher.shape != (channels, latent + 1):
            raise ValueError(f"fisher must have shape (C, d+1) = ({channels}, {latent + 1}), "
                             f"got {tuple(self.fisher.shape)}")
        tensors = self.tensors()
        for name, tensor in self.named_tensors().items():
            if not tensor.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor (float32/float64/float16/bfloat16), got "
                                f"{tensor.dtype}; convert it with .float()")
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) > 1 or len(devices) > 1:
            raise TypeError(f"all FVVAEParams tensors must share one dtype and device, got dtypes "
                            f"{sorted(map(str, dtypes))} and devices {sorted(map(str, devices))}")

    def _check_values(self) -> None:
        check_finite_tensors(self.named_tensors(), "FV-VAE parameters must be finite: retrain, or reload them")
        require(self.sigma_x > 0, "sigma_x must be positive in every channel",
                details=lambda: f", got {float(self.sigma_x.min()):g} in channel {int(self.sigma_x.argmin())}")
        if self.fisher is not None:
            require(self.fisher >= 0, "fisher is a mean of squares and must be ≥ 0 in every entry",
                    details=lambda: f", got {float(self.fisher.min()):g}")

    def __repr__(self) -> str:
        layers = ", ".join(f"{w.shape[1]}→{w.shape[0]}{' ReLU' if relu else ''}" for w, _, relu in self.encoder)
        fisher = "None" if self.fisher is None else f"({self.channels}, {self.latent_dim + 1})"
        return (f"FVVAEParams(C={self.channels}, d={self.latent_dim}, encoder=[{layers}], fisher={fisher}, "
                f"prenorm={self.prenorm!r}, norm_scale={self.norm_scale:g}, spp={self.spp!r}, dtype={self.dtype}, "
                f"device={self.device})")

    def tensors(self) -> List[Tensor]:
        return list(self.named_tensors().values())

    def named_tensors(self) -> Dict[str, Tensor]:
        """The tensors by the names errors use: encoder[i].weight, encoder[i].bias, dec_weight, …, fisher."""
        named = {}
        for index, (weight, bias, _) in enumerate(self.encoder):
            named[f"encoder[{index}].weight"], named[f"encoder[{index}].bias"] = weight, bias
        named.update(dec_weight=self.dec_weight, dec_bias=self.dec_bias, sigma_x=self.sigma_x)
        if self.fisher is not None:
            named["fisher"] = self.fisher
        return named

    @property
    def channels(self) -> int:
        return self.dec_weight.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.dec_weight.shape[1]

    @property
    def dim(self) -> int:
        """Length of the Fisher vector: C·(d+1)."""
        return self.channels * (self.latent_dim + 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.dec_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.dec_weight.device

    @property
    def inv_sigma2(self) -> Tensor:
        return self.sigma_x.pow(-2)

    def to(self, *args, **kwargs) -> "FVVAEParams":
        """A copy with every tensor moved/cast like Tensor.to(*args, **kwargs)."""
        def move(t):
            return None if t is None else t.to(*args, **kwargs)
        return replace(self, encoder=[(move(w), move(b), relu) for w, b, relu in self.encoder],
                       dec_weight=move(self.dec_weight), dec_bias=move(self.dec_bias),
                       sigma_x=move(self.sigma_x), fisher=move(self.fisher))


def _as_tensor(name: str, value, *, optional: bool = False) -> Optional[Tensor]:
    """A parameter as a tensor: tensors as they are, numpy arrays shared with torch; anything else refused."""
    if value is None and optional:
        return None
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TypeError(f"FVVAEParams' {name} must be a torch.Tensor (or a numpy array), got {type(value).__name__}; "
                    "wrap it with torch.tensor(...)")
