"""torch.autocast: the ops cast their floating inputs to one dtype (the autocast dtype; an out= buffer's own for
the out-variant) and the kernels accumulate in float32. Errors are judged against torch's own at that precision
(flash-attention's rule): |ours − fp32| ≤ 2·|torch's − fp32| + atol, norm-wise. Normalised Fisher vectors are
compared as signed squares sign(v)·v² (the L1-normalised raw vector): the signed square root turns a rounding
error δ of an entry near 0 into √δ."""
import pytest
import torch
from torch import nn

import fvkernels
from fvkernels.nn import FVVAE

from tests.helpers import cpu_backends, random_problem, relative_error


def autocast_target(dtype):
    """The dtype the layer computes and returns in under an autocast to dtype: float32 for float16, whose range a
    sum over a set overflows (README, torch.autocast)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


KERNEL_BACKENDS = [b for b in cpu_backends() if b not in ("torch", "triton")]
ATOL = 1e-3


def autocast(device="cpu", dtype=torch.bfloat16):
    return torch.autocast(device, dtype=dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_the_op_takes_mixed_dtypes_and_casts_them(backend):
    z, x, w, b, s, f, lengths = [t.float() if t.is_floating_point() else t for t in random_problem(4, 30, 17, 9)]
    expected = fvkernels.fv_accumulate(z, x, w, b, s, f, lengths, backend="torch")
    with autocast():
        z_low = z.bfloat16()  # as a linear layer gives it under autocast; x stays float32
        out = fvkernels.fv_accumulate(z_low, x, w, b, s, f, lengths, backend=backend)
        torch_out = fvkernels.fv_accumulate(z_low, x, w, b, s, f, lengths, backend="torch")
    assert out.dtype == torch.bfloat16
    assert relative_error(out, expected) <= 2 * relative_error(torch_out, expected) + ATOL
    kept = torch.empty(4, 17, 10, dtype=torch.float32)  # the out-variant computes in its buffer's dtype
    with autocast():
        fvkernels.fv_accumulate(z_low, x, w, b, s, f, lengths, backend=backend, out=kept)
    assert relative_error(kept, expected) <= 2 * relative_error(torch_out, expected) + ATOL


def signed_square(fv):
    return fv.float() * fv.float().abs()


def model_with_layer():
    torch.manual_seed(0)
    layer = FVVAE(24, 11, (40,), num_classes=3)
    layer.fit_fisher([torch.rand(6, 24, 4, 4)])
    return nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), layer)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_layer_forward_loss_and_backward_under_autocast(mode):
    model = getattr(model_with_layer(), mode)()
    layer = model[2]
    images, labels = torch.rand(5, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    readout = torch.randn(5, layer.dim)

    def step(backend=None):
        if backend is not None:
            layer.backend = backend
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout and noise in every run
        fv = model(images)
        (signed_square(fv) * readout).sum().backward()
        grad = model[0].weight.grad.clone()
        torch.manual_seed(1)
        losses = layer.loss(model[1](model[0](images)), labels)
        return fv, grad, losses
    expected_fv, expected_grad, expected_losses = step()
    with autocast():
        fv, grad, losses = step()
        torch_fv, torch_grad, torch_losses = step("torch")
    assert fv.dtype == torch.bfloat16 and losses["total"].dtype == torch.float32
    fv, torch_fv, expected_fv = signed_square(fv), signed_square(torch_fv), signed_square(expected_fv)
    assert relative_error(fv, expected_fv) <= 2 * relative_error(torch_fv, expected_fv) + ATOL
    assert relative_error(grad, expected_grad) <= 2 * relative_error(torch_grad, expected_grad) + ATOL
    for name in ("rec", "reg", "cls"):
        assert abs(float(losses[name].detach()) - float(expected_losses[name].detach())) <= 2e-2 * abs(float(expected_losses[name].detach())) + 1e-2
    losses["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    layer.backend = "auto"
    with torch.no_grad(), autocast():  # inference under autocast: the same path, no buffers of the wrong dtype
        assert torch.equal(signed_square(model(images)), fv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype):
    model = model_with_layer().cuda().eval()
    images = torch.rand(5, 3, 4, 4, device="cuda")
    with torch.no_grad():
        expected = model(images)
        with autocast("cuda", dtype):
            fv = model(images)
        model[2].backend = "torch"
        with autocast("cuda", dtype):
            torch_fv = model(images)
    assert fv.dtype == autocast_target(dtype)
    fv, torch_fv, expected = signed_square(fv), signed_square(torch_fv), signed_square(expected)
    assert relative_error(fv, expected) <= 2 * relative_error(torch_fv, expected) + ATOL
