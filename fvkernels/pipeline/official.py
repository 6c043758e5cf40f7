"""The official MATLAB/Caffe release (github.com/fv-vae/fv-vae): its weight file (DESIGN §3) and its output layout."""
from __future__ import annotations

import os

import torch
from torch import Tensor

from fvkernels.pipeline.params import FVVAEParams

OFFICIAL_RELEASE = "github.com/fv-vae/fv-vae, vae_models/"
MAT5_HEADER = b"MATLAB 5.0 MAT-file"


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
    except (PermissionError, IsADirectoryError):
        raise  # the message already says what went wrong with the path
    except Exception as error:  # scipy's errors for a damaged file range from OSError to IndexError
        raise ValueError(_unreadable_mat(path, error)) from error
    try:
        return _official_params(contents)
    except (ValueError, TypeError) as error:  # name the file: its contents are what is wrong
        raise type(error)(f"{path!r}: {error}") from None


def _unreadable_mat(path: str, error: Exception) -> str:
    with open(path, "rb") as handle:
        header = handle.read(len(MAT5_HEADER))
    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
    if MAT5_HEADER.startswith(header):  # the header, or a file cut inside it (empty included)
        return (f"{path!r} is damaged (truncated or corrupt): scipy cannot read this MATLAB file ({reason}); download "
                f"it again from {OFFICIAL_RELEASE}")
    return (f"{path!r} is not a MATLAB v5 .mat file scipy can read ({reason}); expected a caffe_vae_weights_*.mat "
            f"of the official release ({OFFICIAL_RELEASE})")


def _official_params(contents: dict) -> FVVAEParams:
    if "caffe_vae_weights" not in contents:
        variables = [k for k in contents if not k.startswith("__")]
        raise ValueError(f"the file holds no 'caffe_vae_weights' struct (variables: {variables})")
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
