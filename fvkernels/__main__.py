"""Command line: `python -m fvkernels demo | backends` (also installed as the `fvkernels` console script)."""
from __future__ import annotations

import argparse
import ctypes
import sys
import time

import torch


def backend_demo(args) -> int:
    """Encodes random CNN-like activations with every available backend; prints agreement and speed."""
    from fvkernels import FVVAEParams, available_backends, fv_vae_encode
    from fvkernels.ops import dispatch

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    channels, latent, hidden = args.channels, args.latent, args.hidden
    encoder = [(torch.randn(hidden, channels) / channels ** 0.5, torch.zeros(hidden), True),
               (torch.randn(latent, hidden) / hidden ** 0.5, torch.zeros(latent), False)]
    params = FVVAEParams(encoder, torch.randn(channels, latent) / latent ** 0.5, torch.full((channels,), 0.01),
                         torch.ones(channels), torch.rand(channels, latent + 1) + 0.5, prenorm="descriptor")
    acts = torch.relu(torch.randn(args.batch, channels, args.size, args.size))  # post-ReLU conv maps
    print(f"fvkernels demo: {args.batch} maps of {channels}×{args.size}×{args.size} → "
          f"{params.dim}-d FV-VAE (encoder {channels}→{hidden}→{latent}), device {device}")
    print(f"available backends: {', '.join(available_backends())}")
    expected = fv_vae_encode(acts.double(), params.to(torch.float64), backend="torch")
    print(f"{'backend':<8} {'max rel. error vs float64':>26} {'ms per map':>11}")
    for backend in dispatch.BACKENDS:
        if dispatch.unavailable_reason(backend, device) is not None:
            continue
        acts_d, params_d = acts.to(device), params.to(device)
        fv_vae_encode(acts_d, params_d, backend=backend)  # warm-up (JIT, autotune, thread pools)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            out = fv_vae_encode(acts_d, params_d, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / args.repeats
        signed_square = lambda v: v.double().cpu() * v.double().cpu().abs()  # noqa: E731 (√ amplifies ε near 0)
        error = float((signed_square(out) - signed_square(expected)).abs().max() / signed_square(expected).abs().max())
        print(f"{backend:<8} {error:>26.2e} {1e3 * elapsed / args.batch:>11.2f}")
    return 0


def run_demo(args) -> int:
    from fvkernels import demo

    return demo.run(args)


def keep_freed_memory() -> None:
    """Let glibc keep freed blocks instead of returning each large one to the OS: training and encoding
    allocate and free tens of MB per step, and re-faulting those pages cost a quarter of the run time.
    Process-wide, so only this command line does it, never an import of the library."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    mmap_threshold, trim_threshold = -3, -1  # mallopt parameters M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    libc.mallopt(mmap_threshold, 1 << 30)
    libc.mallopt(trim_threshold, (1 << 31) - 1)


def main(argv=None) -> int:
    from fvkernels import demo as demo_module

    keep_freed_memory()
    parser = argparse.ArgumentParser(prog="fvkernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="FV-VAE vs classic encoders on Fashion-MNIST (table, plots)",
                               description=demo_module.__doc__)
    demo_module.add_arguments(demo)
    demo.set_defaults(run=run_demo)
    backends = commands.add_parser("backends", help="encode random activations with every backend (agreement, speed)")
    backends.add_argument("--batch", type=int, default=16)
    backends.add_argument("--channels", type=int, default=512)
    backends.add_argument("--size", type=int, default=14, help="spatial size H = W of the maps")
    backends.add_argument("--latent", type=int, default=256)
    backends.add_argument("--hidden", type=int, default=512)
    backends.add_argument("--repeats", type=int, default=3)
    backends.add_argument("--seed", type=int, default=0)
    backends.set_defaults(run=backend_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
