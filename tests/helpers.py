"""What the tests share: backends to test, the error measure, random problems and parameters, poisoned outputs,
files in the formats fvkernels reads, a toy training problem, a tiny corpus and backbone, and a process group."""
import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fvkernels import FVVAEParams
from fvkernels.app.backbones import Backbone
from fvkernels.app.distributed import leaving_at_exit
from fvkernels.common.files import state_digest
from fvkernels.nn import FVVAE
from fvkernels.ops import _extension, dispatch
from fvkernels.training import SetData

PROCESSES = 2
IMAGE_SIZE = 16


# ---- backends and errors -----------------------------------------------------------------------------------

def cpu_backends():
    """Backends that run on CPU tensors in this process."""
    return [b for b in dispatch.BACKENDS if dispatch.unavailable_reason(b, torch.device("cpu")) is None]


def gpu_backends():
    if not torch.cuda.is_available():
        return []
    return [b for b in dispatch.BACKENDS if dispatch.unavailable_reason(b, torch.device("cuda")) is None]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (norm-wise: entries near zero do not blow it up)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


# ---- random problems -------------------------------------------------------------------------------------

def random_problem(num_sets, set_size, channels, latent, dtype=torch.float64, device="cpu", ragged=True,
                   fisher=True):
    """Inputs of fv_accumulate with a realistic mix of active and inactive decoder units."""
    options = dict(dtype=dtype, device=device)
    z = torch.randn(num_sets, set_size, latent, **options)
    x = torch.rand(num_sets, set_size, channels, **options)
    dec_weight = torch.randn(channels, latent, **options) / latent ** 0.5
    dec_bias = torch.randn(channels, **options) * 0.5
    inv_sigma2 = torch.rand(channels, **options) + 0.5
    fisher_rsqrt = torch.rand(channels, latent + 1, **options) + 0.5 if fisher else None
    lengths = None
    if ragged:
        lengths = torch.randint(0, set_size + 1, (num_sets,), device=device)
        lengths[0] = set_size
        if num_sets > 1:
            lengths[1] = 0
    return z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths


def random_params(channels, latent, hidden=(11,), dtype=torch.float64, prenorm="descriptor", spp=None,
                  norm_scale=1.0, fisher=True):
    widths = [channels, *hidden, latent]
    encoder = [(torch.randn(out, inp, dtype=dtype) / inp ** 0.5, torch.randn(out, dtype=dtype) * 0.1, i < len(hidden))
               for i, (inp, out) in enumerate(zip(widths[:-1], widths[1:]))]
    return FVVAEParams(encoder, torch.randn(channels, latent, dtype=dtype) / latent ** 0.5,
                       torch.randn(channels, dtype=dtype) * 0.1 + 0.1, torch.rand(channels, dtype=dtype) + 0.5,
                       torch.rand(channels, latent + 1, dtype=dtype) + 0.1 if fisher else None,
                       prenorm=prenorm, norm_scale=norm_scale, spp=spp)


def poisoned_output(num_sets, channels, latent, dtype, set_padding=0, device="cpu"):
    """(N, C, d+1) output with `set_padding` unused entries between sets (stride(0) > C·(d+1)), filled with
    NaN so that any entry a kernel fails to write shows."""
    storage = torch.full((num_sets, channels * (latent + 1) + set_padding), float("nan"), dtype=dtype, device=device)
    return storage[:, : channels * (latent + 1)].view(num_sets, channels, latent + 1)


# ---- files in the formats fvkernels reads -----------------------------------------------------------------

def write_official_mat(path, channels, hidden, latent, rng):
    """A weight file laid out like caffe_vae_weights_*.mat (DESIGN §3), via scipy."""
    from scipy.io import savemat

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    layer_type = [("w", object), ("b", object), ("act", object)]
    widths = [channels, *hidden, latent]
    encoder = np.empty((1, len(widths) - 1), dtype=layer_type)
    for i, (inp, out) in enumerate(zip(widths[:-1], widths[1:])):
        encoder[0, i] = ((rng.standard_normal((1, 1, inp, out)) / np.sqrt(inp)).astype(np.float32),
                         (rng.standard_normal((out, 1)) * 0.1).astype(np.float32),
                         "ReLU" if i < len(hidden) else "Linear")
    decoder = np.empty((1, 1), dtype=layer_type)
    decoder[0, 0] = ((rng.standard_normal((1, 1, channels, latent)) / np.sqrt(latent)).astype(np.float32),
                     (rng.standard_normal((channels, 1)) * 0.1 + 0.05).astype(np.float32), "ReLU")
    root = np.empty((1, 1), dtype=[("norm_scale", object), ("encoder", object), ("decoder", object),
                                   ("decoder_sigma", object)])
    root[0, 0] = (np.array([[158.0]]), encoder, decoder, (rng.random((channels, 1)) + 0.5).astype(np.float32))
    savemat(path, {"caffe_vae_weights": root})


def write_idx(path, array, compress):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    (gzip.open if compress else open)(path, "wb").write(header + array.tobytes())


# ---- training, extraction and processes ------------------------------------------------------------------

def toy_data(num_sets=48):
    """Two classes whose descriptors live on different channels: learnable in a few steps."""
    labels = torch.arange(num_sets) % 2
    acts = torch.rand(num_sets, 6, 3, 3) * 0.2
    acts[labels == 0, :3] += 1.0
    acts[labels == 1, 3:] += 1.0
    return SetData(acts, labels)


def new_layer():
    torch.manual_seed(0)
    return FVVAE(6, 4, (8,), num_classes=2, lambda_cls=10.0)


class TinyCNN(nn.Module):
    """A stand-in backbone: 16 px images → 6 × 7 × 7 post-ReLU maps; NaN maps for an all-white image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)

    def forward(self, images):
        maps = F.relu(self.conv(images))
        white = images.flatten(1).amin(1) >= 1
        return maps.masked_fill(white[:, None, None, None], float("nan"))


def tiny_backbone():
    torch.manual_seed(0)
    cnn = TinyCNN().eval()
    return Backbone(cnn, IMAGE_SIZE, {"backbone": "tiny-cnn", "image_size": IMAGE_SIZE,
                                      "weights_sha256": state_digest(cnn)})


def tiny_layer(seed=0):
    torch.manual_seed(seed)
    layer = FVVAE(6, 3, (5,)).eval()
    layer.fit_fisher([torch.rand(8, 6, 7, 7)])
    return layer


def write_image(path, rng, pixels=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels if pixels is not None else (rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(path)


def make_corpus(folder, images=7, frames=(4, 3)):
    """images `img{i}.png` and videos `vid{v}/frame_*.png`, labelled; returns the list file."""
    rng = np.random.default_rng(0)
    lines = []
    for index in range(images):
        write_image(folder / "data" / f"img{index}.png", rng)
        lines.append(f"img{index}.png {index % 2}")
    for video, count in enumerate(frames):
        for frame in range(count):
            write_image(folder / "data" / f"vid{video}" / f"frame_{frame + 1:04d}.png", rng)
        lines.append(f"vid{video} {video % 2}")
    list_file = folder / "list.txt"
    list_file.write_text("\n".join(lines) + "\n")
    return list_file


def run_processes(task, folder, *args, processes=PROCESSES):
    """task(rank, folder, *args) in `processes` fresh processes joined in a gloo group (a file store in
    `folder`: no port to pick). An exception or a crash in any of them fails the caller."""
    store = folder / f".process-group-{os.urandom(8).hex()}"  # a killed group leaves its file behind
    mp.spawn(_join_and_run, args=(processes, str(store), task, (folder, *args)), nprocs=processes)


def _join_and_run(rank, processes, store, task, args):
    torch.set_num_threads(1)  # two processes on two cores
    torch.manual_seed(0)  # as conftest seeds every test, so both sides make the same data
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=processes)
    with leaving_at_exit(True):
        task(rank, *args)


# ---- the CPU kernels' instruction-set builds -----------------------------------------------------------

ISA_ORDER = ("generic", "avx2", "avx512")


def runnable_isas():
    """The instruction-set builds this CPU can run, the kernel's own choice last."""
    if _extension.IMPORT_ERROR is not None:
        return []
    override = os.environ.pop("FVK_CPU_ISA", None)
    try:
        best = _extension.extension().cpu_kernel_isa()
    finally:
        if override is not None:
            os.environ["FVK_CPU_ISA"] = override
    return list(ISA_ORDER[: ISA_ORDER.index(best) + 1])

