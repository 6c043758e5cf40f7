"""The parameters of a trained FV-VAE (DESIGN §2) and the official MATLAB/Caffe release's weight file (§3)."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
from torch import Tensor

PRENORMS = ("descriptor", "map", None)
SPP_MODES = ("official", None)
FISHER_FLOOR = 1e-12

EncoderLayer = Tuple[Tensor, Tensor, bool]


def floor_for(dtype: torch.dtype, floor: float) -> float:
    """`floor`, raised to the smallest normal number of dtype: 1e-12 is 0 in float16, where a zero norm
    would then divide to inf and 0·inf to NaN."""
    return max(floor, torch.finfo(dtype).tiny)


@dataclass
class FVVAEParams:
    """What `fv_vae_encode` needs: the inference MLP, the decoder, σx, and optionally the diagonal Fisher.

    encoder: list of (weight (out, in), bias (out,), relu) applied in order to the descriptors;
    dec_weight (C, d), dec_bias (C,), sigma_x (C,) > 0, fisher (C, d+1) = mean of G² or None;
    prenorm: "descriptor" (each x_t to norm norm_scale), "map" (each set / feature map as one vector,
    the official release) or None; spp: "official" (the release's 50-cell max-pooling pyramid over
    7×7 maps) or None.
    """

    encoder: List[EncoderLayer]
    dec_weight: Tensor
    dec_bias: Tensor
    sigma_x: Tensor
    fisher: Optional[Tensor] = None
    prenorm: Optional[str] = "descriptor"
    norm_scale: float = 1.0
    spp: Optional[str] = None

    def __post_init__(self) -> None:
        self.encoder = [(w, b, bool(relu)) for w, b, relu in self.encoder]
        self._validate()

    @property
    def fisher_rsqrt(self) -> Optional[Tensor]:
        """1/sqrt(max(F, floor)) (DESIGN §1.6), derived from `fisher` on use so that it never goes stale."""
        if self.fisher is None:
            return None
        return self.fisher.clamp_min(floor_for(self.fisher.dtype, FISHER_FLOOR)).rsqrt()

    def _validate(self) -> None:
        if self.prenorm not in PRENORMS:
            raise ValueError(f"prenorm must be one of {PRENORMS}, got {self.prenorm!r}")
        if self.spp not in SPP_MODES:
            raise ValueError(f"spp must be one of {SPP_MODES}, got {self.spp!r}")
        if not float(self.norm_scale) > 0:
            raise ValueError(f"norm_scale must be positive, got {self.norm_scale}")
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
        if not bool((self.sigma_x > 0).all()):
            raise ValueError("sigma_x must be positive in every channel")
        if self.fisher is not None and self.fisher.shape != (channels, latent + 1):
            raise ValueError(f"fisher must have shape (C, d+1) = ({channels}, {latent + 1}), "
                             f"got {tuple(self.fisher.shape)}")
        tensors = self.tensors()
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) > 1 or len(devices) > 1:
            raise TypeError(f"all FVVAEParams tensors must share one dtype and device, got dtypes "
                            f"{sorted(map(str, dtypes))} and devices {sorted(map(str, devices))}")

    def tensors(self) -> List[Tensor]:
        flat = [t for w, b, _ in self.encoder for t in (w, b)] + [self.dec_weight, self.dec_bias, self.sigma_x]
        return flat + ([self.fisher] if self.fisher is not None else [])

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


def to_official_layout(fv: Tensor, channels: int) -> Tensor:
    """Reorders (..., C·(d+1)) row-major Fisher vectors to the official MATLAB column-major order."""
    if channels < 1 or fv.dim() < 1 or fv.shape[-1] % channels:
        raise ValueError(f"fv's last dimension must be a multiple of C = {channels}, got shape {tuple(fv.shape)}")
    width = fv.shape[-1] // channels
    return fv.reshape(*fv.shape[:-1], channels, width).transpose(-1, -2).reshape(fv.shape)


def _mat_field(struct, name: str, where: str):
    if name not in (struct.dtype.names or ()):
        raise ValueError(f"{where} has no field {name!r} (fields: {struct.dtype.names}); is this an official "
                         "FV-VAE caffe_vae_weights_*.mat file?")
    return struct[name]


def _mat_vector(struct, name: str, where: str) -> Tensor:
    return torch.from_numpy(_mat_field(struct, name, where).astype("float32").reshape(-1))


def _caffe_matrix(struct, where: str) -> Tensor:
    """Caffe's 1×1 conv weight (1, 1, in, out) → (in, out) float32."""
    weight = _mat_field(struct, "w", where)
    if weight.ndim != 4 or weight.shape[:2] != (1, 1):
        raise ValueError(f"{where}.w must have the Caffe 1×1 conv shape (1, 1, in, out), got {weight.shape}")
    return torch.from_numpy(weight[0, 0].astype("float32"))


def _caffe_relu(struct, where: str) -> bool:
    act = str(_mat_field(struct, "act", where).reshape(-1)[0])
    if act not in ("ReLU", "Linear"):
        raise ValueError(f"{where}.act must be 'ReLU' or 'Linear', got {act!r}")
    return act == "ReLU"


def load_official_weights(path) -> FVVAEParams:
    """Reads `caffe_vae_weights_*.mat` of the official release (DESIGN §3) into FVVAEParams.

    The result reproduces the release's extraction: prenorm="map" with its norm_scale and spp="official".
    """
    from scipy.io import loadmat  # only this loader needs scipy

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no official FV-VAE weight file at {path!r}")
    try:
        contents = loadmat(path, squeeze_me=False, struct_as_record=True)
    except OSError:
        raise  # permissions, I/O: the message already says what went wrong with the file
    except (ValueError, TypeError, NotImplementedError) as error:
        raise ValueError(f"{path!r} is not a MATLAB .mat file scipy can read ({error}); expected a "
                         "caffe_vae_weights_*.mat of the official release (github.com/fv-vae/fv-vae, vae_models/)") from error
    if "caffe_vae_weights" not in contents:
        variables = [k for k in contents if not k.startswith("__")]
        raise ValueError(f"{path!r} holds no 'caffe_vae_weights' struct (variables: {variables})")
    root = contents["caffe_vae_weights"].reshape(-1)[0]
    encoder = []
    for index, layer in enumerate(_mat_field(root, "encoder", "caffe_vae_weights").reshape(-1)):
        where = f"caffe_vae_weights.encoder({index + 1})"
        weight = _caffe_matrix(layer, where)
        encoder.append((weight.t().contiguous(), _mat_vector(layer, "b", where), _caffe_relu(layer, where)))
    decoder = _mat_field(root, "decoder", "caffe_vae_weights").reshape(-1)[0]
    if not _caffe_relu(decoder, "caffe_vae_weights.decoder"):
        raise ValueError("caffe_vae_weights.decoder.act must be 'ReLU': FV-VAE's decoder ends in a ReLU")
    return FVVAEParams(
        encoder=encoder,
        dec_weight=_caffe_matrix(decoder, "caffe_vae_weights.decoder").contiguous(),
        dec_bias=_mat_vector(decoder, "b", "caffe_vae_weights.decoder"),
        sigma_x=_mat_vector(root, "decoder_sigma", "caffe_vae_weights"),
        prenorm="map",
        norm_scale=float(_mat_vector(root, "norm_scale", "caffe_vae_weights")[0]),
        spp="official",
    )
