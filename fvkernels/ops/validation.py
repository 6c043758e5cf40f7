"""Argument checks of the op family (DESIGN §2: errors name the argument and the shapes seen).

The public entry points (fv_accumulate, fv_vae_encode) check everything once per call, outside the ops; the
one value check (lengths in range) reads the device once eagerly and becomes an in-graph assertion under
torch.compile. Every kernel call also checks the structure it relies on to stay inside its buffers (shapes,
dtypes, devices, strides: no values read), so that the registered ops are safe to call directly."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from fvkernels.common.checks import require, unbatched

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(name: str, value, ndim: int, dims: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {dims}, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have shape {dims} ({ndim} dims), got shape {tuple(value.shape)}")
    return value


def autocasting(device: torch.device) -> bool:
    """Whether torch.autocast is on for device: the ops then take inputs of mixed floating dtypes and cast them."""
    return torch.is_autocast_enabled(device.type)


def autocast_target(device_type: str) -> torch.dtype:
    """What the ops cast their floating inputs (float64 aside, as autocast does) to under torch.autocast: bfloat16
    when that is autocast's dtype, float32 otherwise — a sum over a set overflows float16's range (65504)."""
    dtype = torch.get_autocast_dtype(device_type)
    return dtype if dtype == torch.bfloat16 else torch.float32


def compute_dtype(inputs_dtype: torch.dtype, device: torch.device, out: Optional[Tensor] = None) -> torch.dtype:
    """The dtype the kernels compute in for a call: the inputs' own, or under torch.autocast the cast target (the
    buffer's dtype for out=)."""
    if not autocasting(device) or inputs_dtype == torch.float64:
        return inputs_dtype
    return out.dtype if out is not None else autocast_target(device.type)


def check_float_dtypes(named: dict, *, mixed_allowed: bool = False) -> torch.dtype:
    dtypes = {}
    for name, value in named.items():
        if value is None:
            continue
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float32/float64/float16/bfloat16), got {value.dtype}")
        dtypes.setdefault(value.dtype, []).append(name)
    if len(dtypes) > 1 and not mixed_allowed:
        seen = "; ".join(f"{dtype}: {', '.join(names)}" for dtype, names in dtypes.items())
        raise TypeError(f"all floating inputs must share one dtype, got {seen}; convert them with .to(dtype)")
    return next(iter(dtypes))


def check_same_device(named: dict) -> torch.device:
    devices = {}
    for name, value in named.items():
        if value is not None:
            devices.setdefault(value.device, []).append(name)
    if len(devices) > 1:
        seen = "; ".join(f"{device}: {', '.join(names)}" for device, names in devices.items())
        raise ValueError(f"all inputs must be on one device, got {seen}; move them with .to(device)")
    return next(iter(devices))


def check_lengths(lengths, num_sets: int, set_size: int, device: torch.device, *,
                  check_values: bool = True) -> Optional[Tensor]:
    """Validates `lengths` ((N,) integers in [0, T]) and returns it as a contiguous int64 tensor on `device`.
    check_values=False leaves the range to the kernels (which refuse or clamp it): no read of the device."""
    if lengths is None:
        return None
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths, device=device)
        lengths = lengths.long() if lengths.numel() == 0 else lengths  # [] would be float32
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.shape != (num_sets,):
        raise ValueError(f"lengths must have shape (N,) = ({num_sets},), got {tuple(lengths.shape)}")
    if lengths.device != device:
        raise ValueError(f"lengths is on {lengths.device} but the descriptors are on {device}; "
                         f"move it with lengths.to({str(device)!r})")
    lengths = lengths.to(torch.int64).contiguous()
    if num_sets and check_values:
        require((lengths >= 0) & (lengths <= set_size), f"lengths must lie in [0, T] = [0, {set_size}]",
                details=lambda: f", got values in [{int(unbatched(lengths).min())}, {int(unbatched(lengths).max())}]")
    return lengths


def check_fv_inputs(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, x_scale=None, *,
                    check_values: bool = True) -> Optional[Tensor]:
    """Validates fv_accumulate's arguments (DESIGN §2) and the prenorm scale x_scale (N, T); returns lengths as
    int64 or None."""
    check_tensor("z", z, 3, "(N, T, d)")
    check_tensor("x", x, 3, "(N, T, C)")
    check_tensor("dec_weight", dec_weight, 2, "(C, d)")
    check_tensor("dec_bias", dec_bias, 1, "(C,)")
    check_tensor("inv_sigma2", inv_sigma2, 1, "(C,)")
    if fisher_rsqrt is not None:
        check_tensor("fisher_rsqrt", fisher_rsqrt, 2, "(C, d+1)")
    if x_scale is not None:
        check_tensor("x_scale", x_scale, 2, "(N, T)")
    num_sets, set_size, latent = z.shape
    channels = x.shape[2]
    if x.shape[:2] != z.shape[:2]:
        raise ValueError(f"x (N, T, C) and z (N, T, d) must agree on N and T, got x {tuple(x.shape)} "
                         f"and z {tuple(z.shape)}")
    if dec_weight.shape != (channels, latent):
        raise ValueError(f"dec_weight must have shape (C, d) = ({channels}, {latent}) to match x {tuple(x.shape)} "
                         f"and z {tuple(z.shape)}, got {tuple(dec_weight.shape)}")
    for name, value in (("dec_bias", dec_bias), ("inv_sigma2", inv_sigma2)):
        if value.shape != (channels,):
            raise ValueError(f"{name} must have shape (C,) = ({channels},), got {tuple(value.shape)}")
    if fisher_rsqrt is not None and fisher_rsqrt.shape != (channels, latent + 1):
        raise ValueError(f"fisher_rsqrt must have shape (C, d+1) = ({channels}, {latent + 1}), "
                         f"got {tuple(fisher_rsqrt.shape)}")
    if x_scale is not None and x_scale.shape != (num_sets, set_size):
        raise ValueError(f"x_scale must have shape (N, T) = ({num_sets}, {set_size}), got {tuple(x_scale.shape)}")
    floats = dict(z=z, x=x, dec_weight=dec_weight, dec_bias=dec_bias, inv_sigma2=inv_sigma2,
                  fisher_rsqrt=fisher_rsqrt, x_scale=x_scale)
    device = check_same_device(floats)
    check_float_dtypes(floats, mixed_allowed=autocasting(device))
    return check_lengths(lengths, num_sets, set_size, device, check_values=check_values)


def check_out_buffer(out, shape: tuple, dtype: torch.dtype, device: torch.device, name: str = "out") -> None:
    """A buffer the kernels write: the given shape, dtype and device, each set's block contiguous and the sets
    apart from each other (a kernel writes a set's block as one run of memory)."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(out).__name__}")
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(f"{name} must be a {dtype} tensor of shape {shape} on {device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    if out.dim() < 2 or out.shape[0] == 0:
        return
    # From shape and strides, not out[0]: a traced (fake) tensor of a device this build lacks cannot be indexed.
    block_numel, contiguous = 1, True
    for size, stride in reversed(list(zip(out.shape[1:], out.stride()[1:]))):
        contiguous = contiguous and (size == 1 or stride == block_numel)
        block_numel *= size
    if block_numel > 1 and not contiguous:
        raise ValueError(f"{name}'s per-set block must be contiguous ({name}[0].is_contiguous()); pass a contiguous "
                         "tensor")
    if out.shape[0] > 1 and out.stride(0) < block_numel:
        raise ValueError(f"{name}'s sets overlap in memory (stride {out.stride(0)} along N for blocks of "
                         f"{block_numel} elements); pass a contiguous tensor")


def memory_span(tensor: Tensor) -> Optional[Tuple[int, int]]:
    """[first, last + 1) byte addresses a tensor's elements occupy, or None when it has none."""
    if tensor.numel() == 0:
        return None
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    start = tensor.data_ptr()
    return start, start + (last + 1) * tensor.element_size()


def check_no_overlap(outputs: Dict[str, Optional[Tensor]], inputs: Dict[str, Optional[Tensor]]) -> None:
    """Refuses an output whose memory overlaps an input's (or another output's): the kernels read inputs while they
    write, so an overlap gives wrong numbers on some backends and right ones on others. Spans are compared, so
    interleaved views of one buffer count as overlapping."""
    spans = {name: memory_span(t) for name, t in {**inputs, **outputs}.items()
             if t is not None and t.device.type != "meta" and not is_fake(t)}
    names = list(spans)
    for position, name in enumerate(names):
        if name not in outputs or spans[name] is None:
            continue
        start, end = spans[name]
        for other in names[:position] + names[position + 1:]:
            if other in outputs and names.index(other) < position:
                continue  # each pair of outputs once
            if spans[other] is not None and spans[other][0] < end and start < spans[other][1]:
                raise ValueError(f"{name} overlaps {other} in memory, which the kernels do not support (they read "
                                 f"their inputs while they write): pass a separate buffer for {name} (e.g. "
                                 f"torch.empty_like), or {other}.clone()")


def is_fake(tensor: Tensor) -> bool:
    """Traced tensors (FakeTensors of torch.compile, torch.export and opcheck; the functional wrappers a triton_op's
    body sees while AOTAutograd traces it) have no memory to compare."""
    return (isinstance(tensor, (torch._subclasses.fake_tensor.FakeTensor,
                                torch._subclasses.functional_tensor.FunctionalTensor))
            or torch._C._functorch.is_functorch_wrapped_tensor(tensor) or torch._is_functional_tensor(tensor))


def check_out(out, shape: tuple, like: Tensor, inputs: Dict[str, Optional[Tensor]]) -> None:
    """`out=` is for inference into a reused buffer: right shape/dtype/device, each row block contiguous, apart
    from every input in memory, and nothing for autograd to record (the custom op, which allocates, is the
    differentiable path). Under torch.autocast the buffer's floating dtype is the one computed in."""
    autocast_dtype = isinstance(out, Tensor) and out.dtype in FLOAT_DTYPES and autocasting(like.device)
    check_out_buffer(out, shape, out.dtype if autocast_dtype else like.dtype, like.device)
    check_no_overlap({"out": out}, inputs)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs.values()):
        raise ValueError("out= skips autograd; inputs require grad here: call without out= to differentiate, "
                         "or inside torch.no_grad()")


def check_kernel_call(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, out, x_scale,
                      row_sumsq, *, check_overlap: bool = True) -> Optional[Tensor]:
    """The structure a kernel relies on to stay inside its buffers, checked on every call without reading a
    value; returns lengths as contiguous int64. check_overlap=False: the outputs are known to be fresh."""
    lengths = check_fv_inputs(z, x, dec_weight, dec_bias, inv_sigma2, fisher_rsqrt, lengths, x_scale,
                              check_values=False)
    num_sets, _, latent = z.shape
    check_out_buffer(out, (num_sets, x.shape[2], latent + 1), z.dtype, z.device)
    if row_sumsq is not None:
        check_out_buffer(row_sumsq, (num_sets, x.shape[2]), torch.float32, z.device, name="row_sumsq")
        if not row_sumsq.is_contiguous():
            raise ValueError("row_sumsq must be contiguous; pass torch.empty((N, C), dtype=torch.float32)")
    if check_overlap:
        check_no_overlap(dict(out=out, row_sumsq=row_sumsq),
                         dict(z=z, x=x, dec_weight=dec_weight, dec_bias=dec_bias, inv_sigma2=inv_sigma2,
                              fisher_rsqrt=fisher_rsqrt, lengths=lengths, x_scale=x_scale))
    return lengths
