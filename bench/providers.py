"""The implementations compared side by side, and the plain torch FV-VAE pipeline they are measured against.

A provider is a name, a device, an implementation and a dtype. Adding one is one line in PROVIDERS.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from fvkernels import FVVAEParams, fv_accumulate, fv_vae_encode
from fvkernels.ops import dispatch
from fvkernels.ops.reference import fv_accumulate_reference

try:
    from cyvlfeat.fisher import fisher as vl_fisher
    VLFEAT_MISSING: Optional[str] = None
except ImportError as error:
    vl_fisher = None
    VLFEAT_MISSING = f"cyvlfeat is not installed ({error}); install it with bench/install_vlfeat.sh"

NORM_FLOOR = 1e-12
# The implementations that are not fvkernels backends (dispatch.BACKENDS).
EAGER, COMPILE, VLFEAT = "eager", "compile", "vlfeat"


@dataclass(frozen=True)
class Provider:
    name: str  # as the tables show it; "torch" is the eager baseline every ratio refers to
    device: str  # "cpu" or "cuda"
    implementation: str  # EAGER (torch composite), COMPILE (torch.compile of it), VLFEAT, or a fvkernels backend
    dtype: torch.dtype = torch.float32
    # Write into one output buffer kept across calls (out=), as an encoding loop would: no fresh 100 MB+
    # output to page-fault in on every call.
    reuse_output: bool = False

    def __str__(self) -> str:
        return f"{self.device}-{self.name}"

    def unavailable_reason(self) -> Optional[str]:
        if self.device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        if self.implementation == VLFEAT:
            return VLFEAT_MISSING
        if self.implementation in dispatch.BACKENDS:
            device = torch.device(self.device)
            reason = dispatch.unavailable_reason(self.implementation, device)
            if reason is None and not dispatch.supports_dtype(self.implementation, device, self.dtype):
                reason = f"the {self.implementation!r} backend does not support {self.dtype}"
            return reason
        return None


BASELINE = "torch"
PROVIDERS = (
    Provider(BASELINE, "cpu", EAGER),
    Provider("torch.compile", "cpu", COMPILE),
    Provider("cpp", "cpu", "cpp"),
    Provider("cpp-out", "cpu", "cpp", reuse_output=True),
    Provider("cpp-bf16", "cpu", "cpp", torch.bfloat16),
    Provider("cpp-bf16-out", "cpu", "cpp", torch.bfloat16, reuse_output=True),
    Provider(BASELINE, "cuda", EAGER),
    Provider("torch.compile", "cuda", COMPILE),
    Provider("triton", "cuda", "triton"),
    Provider("cuda", "cuda", "cuda"),
    Provider("triton-bf16", "cuda", "triton", torch.bfloat16),
    Provider("cuda-bf16", "cuda", "cuda", torch.bfloat16),
)
# The classic peer, for the whole pipeline only: it encodes descriptors with a GMM, not FV-VAE latents.
VLFEAT_PROVIDER = Provider("vlfeat", "cpu", VLFEAT)


def compiled(fn: Callable, device: str, full: bool) -> Callable:
    """torch.compile of fn for one static shape: mode="max-autotune" on GPU, the default mode on CPU, or the mode
    FVK_BENCH_COMPILE_MODE names (bench/gpu_check.py uses "default" to fit its time)."""
    torch.compiler.reset()  # each case compiles afresh: no recompile limit, no automatic dynamic shapes
    if not full:
        # Inductor's C++ build takes ~30 s per graph on a cold 2-core machine; the smoke run checks that the
        # composite traces and runs (Dynamo + AOTAutograd), the full run measures Inductor's code.
        return torch.compile(fn, backend="aot_eager", dynamic=False)
    mode = os.environ.get("FVK_BENCH_COMPILE_MODE") or ("max-autotune" if device == "cuda" else None)
    return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)


def fv_accumulate_fn(provider: Provider, full: bool) -> Callable[..., Tensor]:
    """fv_accumulate(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths) as the provider computes it."""
    if provider.implementation == EAGER:
        return fv_accumulate_reference
    if provider.implementation == COMPILE:
        return compiled(fv_accumulate_reference, provider.device, full)
    encode = functools.partial(fv_accumulate, backend=provider.implementation)
    return _into_kept_output(encode) if provider.reuse_output else encode


def training_step_fn(provider: Provider, full: bool) -> Callable[..., list]:
    """(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, grad_out) → the gradients w.r.t. the first
    five: one forward and one backward as a training step through the layer runs them."""
    if provider.implementation == EAGER:
        forward = fv_accumulate_reference
    elif provider.implementation == COMPILE:
        forward = compiled(fv_accumulate_reference, provider.device, full)
    else:
        forward = functools.partial(fv_accumulate, backend=provider.implementation)

    def step(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, grad_out) -> list:
        inputs = [t.detach().requires_grad_() for t in (z, x, dec_weight, dec_bias, inv_sigma2)]
        return list(torch.autograd.grad(forward(*inputs, fisher_rsqrt, lengths), inputs, grad_out))
    return step


def _into_kept_output(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """fn(..., out=buffer) with the buffer allocated by the first call and reused by every later one."""
    kept = []

    def run(*args) -> Tensor:
        if not kept:
            kept.append(fn(*args))
            return kept[0]
        return fn(*args, out=kept[0])
    return run


def pipeline_fn(provider: Provider, params: FVVAEParams, full: bool) -> Callable[[Tensor], Tensor]:
    """(N, T, C) descriptor sets → (N, dim) improved Fisher vectors as the provider computes them."""
    if provider.implementation == EAGER:
        return functools.partial(eager_fv_vae_pipeline, params=params)
    if provider.implementation == COMPILE:
        return compiled(functools.partial(eager_fv_vae_pipeline, params=params), provider.device, full)
    encode = functools.partial(fv_vae_encode, params=params, backend=provider.implementation)
    return _into_kept_output(encode) if provider.reuse_output else encode


def eager_fv_vae_pipeline(descriptors: Tensor, params: FVVAEParams) -> Tensor:
    """FV-VAE of (N, T, C) descriptor sets as a researcher writes it in torch, the whole batch at once: the
    pipeline baseline (DESIGN §1 steps 1 and 3–8, descriptor prenorm, improved normalisation)."""
    x_hat = params.norm_scale * descriptors / descriptors.norm(dim=2, keepdim=True).clamp_min(NORM_FLOOR)
    latents = x_hat
    for weight, bias, relu in params.encoder:
        latents = torch.nn.functional.linear(latents, weight, bias)
        if relu:
            latents = latents.relu()
    pre = torch.nn.functional.linear(latents, params.dec_weight, params.dec_bias)
    residual = (pre.relu() - x_hat) / params.sigma_x ** 2 * (pre > 0)
    raw = torch.cat([residual.transpose(1, 2) @ latents, residual.sum(1).unsqueeze(2)], dim=2)
    fv = (raw * params.fisher_rsqrt).flatten(1)
    fv = fv.sign() * fv.abs().sqrt()
    return fv / fv.norm(dim=1, keepdim=True).clamp_min(NORM_FLOOR)


def vlfeat_improved_fisher(descriptors: Tensor, gmm) -> Tensor:
    """VLFeat's improved Fisher vector (vl_fisher, signed square root + L2) of each (T, C) set, one call per set."""
    means, variances, priors = gmm
    sets = descriptors.numpy()
    return torch.from_numpy(np.stack([vl_fisher(descriptor_set, means, variances, priors, improved=True)
                                      for descriptor_set in sets]))
