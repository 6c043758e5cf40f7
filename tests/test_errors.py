"""Bad input gets a clear exception naming the argument and the shapes seen (DESIGN §2)."""
import pytest
import torch

import fvkernels
from fvkernels import FVVAEParams, fv_vae_encode

from tests.helpers import random_params, random_problem


def problem32():
    return [t if t is None or not t.is_floating_point() else t.float() for t in random_problem(2, 5, 4, 3)]


def call(**changes):
    z, x, w, b, s, f, lengths = problem32()
    args = dict(z=z, x=x, dec_weight=w, dec_bias=b, inv_sigma2=s, fisher_rsqrt=f, lengths=lengths)
    args.update(changes)
    return fvkernels.fv_accumulate(**args, backend="torch")


@pytest.mark.parametrize("changes,error,message", [
    (dict(z=torch.randn(2, 5)), ValueError, r"z must have shape \(N, T, d\).*got shape \(2, 5\)"),
    (dict(x=torch.randn(2, 6, 4)), ValueError, r"agree on N and T.*\(2, 6, 4\)"),
    (dict(dec_weight=torch.randn(4, 2)), ValueError, r"dec_weight must have shape \(C, d\) = \(4, 3\)"),
    (dict(dec_bias=torch.randn(5)), ValueError, r"dec_bias must have shape \(C,\) = \(4,\), got \(5,\)"),
    (dict(inv_sigma2=torch.randn(4, 1)), ValueError, r"inv_sigma2 must have shape \(C,\)"),
    (dict(fisher_rsqrt=torch.randn(4, 3)), ValueError, r"fisher_rsqrt must have shape \(C, d\+1\) = \(4, 4\)"),
    (dict(lengths=torch.tensor([1, -1])), ValueError, r"lengths must lie in \[0, T\] = \[0, 5\].*\[-1, 1\]"),
    (dict(lengths=torch.tensor([6, 1])), ValueError, r"lengths must lie in \[0, T\]"),
    (dict(lengths=torch.tensor([1, 2, 3])), ValueError, r"lengths must have shape \(N,\) = \(2,\)"),
    (dict(lengths=torch.tensor([1.0, 2.0])), TypeError, r"lengths must be an integer tensor"),
    (dict(z=torch.randint(0, 3, (2, 5, 3))), TypeError, r"z must be a floating tensor.*torch.int64"),
    (dict(x=torch.rand(2, 5, 4, dtype=torch.float64)), TypeError, r"share one dtype.*float64: x"),
    (dict(z=[[1.0]]), TypeError, r"z must be a torch.Tensor"),
    (dict(x=torch.rand(2, 5, 4, device="meta")), ValueError, r"one device.*meta: x"),
])
def test_fv_accumulate_rejects(changes, error, message):
    with pytest.raises(error, match=message):
        call(**changes)


def test_unknown_and_unavailable_backends():
    z, x, w, b, s, f, lengths = problem32()
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fvkernels.fv_accumulate(z, x, w, b, s, backend="fast")
    with pytest.raises(RuntimeError, match="'cuda' is not available"):
        fvkernels.fv_accumulate(z, x, w, b, s, backend="cuda")


def test_lengths_as_list_and_int32():
    z, x, w, b, s, f, _ = problem32()
    a = fvkernels.fv_accumulate(z, x, w, b, s, f, [5, 2], backend="torch")
    c = fvkernels.fv_accumulate(z, x, w, b, s, f, torch.tensor([5, 2], dtype=torch.int32), backend="torch")
    assert torch.equal(a, c)


def params32(**kwargs):
    return random_params(4, 3, dtype=torch.float32, **kwargs)


@pytest.mark.parametrize("acts,kwargs,error,message", [
    (torch.rand(2, 4), {}, ValueError, r"acts must be \(N, C, H, W\).*got shape \(2, 4\)"),
    (torch.rand(2, 5, 3, 3), {}, ValueError, r"has C = 5 but params expect C = 4"),
    (torch.rand(2, 6, 5), {}, ValueError, r"has C = 5 but params expect C = 4"),
    (torch.rand(2, 4, 3, 3), dict(lengths=[1, 2]), ValueError, r"lengths applies to \(N, T, C\)"),
    (torch.rand(2, 6, 4), dict(lengths=[7, 2]), ValueError, r"lengths must lie in \[0, T\] = \[0, 6\]"),
    (torch.rand(2, 6, 4), dict(lengths=[-1, 2]), ValueError, r"lengths must lie in \[0, T\]"),
    (torch.randint(0, 4, (2, 6, 4)), {}, TypeError, r"acts must be a floating tensor"),
    (torch.rand(2, 6, 4, dtype=torch.float64), {}, TypeError, r"acts is torch.float64 but the FV-VAE parameters are torch.float32; convert one side: acts.to\(torch.float32\)"),
    (torch.rand(2, 4, 3, 3, device="meta"), {}, ValueError, r"acts is on meta but the FV-VAE parameters are on cpu; move one side"),
    ("not a tensor", {}, TypeError, r"acts must be a torch.Tensor"),
])
def test_fv_vae_encode_rejects(acts, kwargs, error, message):
    with pytest.raises(error, match=message):
        fv_vae_encode(acts, params32(), **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_non_finite_acts_name_the_set(bad, requires_grad):
    acts = torch.rand(5, 4, 3, 3)
    acts[3, 1, 2, 0] = bad
    with pytest.raises(ValueError, match=r"acts holds NaN or Inf in set\(s\) \[3\] \(index along N\)"):
        fv_vae_encode(acts.requires_grad_(requires_grad), params32())


def test_spp_needs_7x7_maps():
    with pytest.raises(ValueError, match="spp='official' pools 7×7 maps"):
        fv_vae_encode(torch.rand(2, 4, 6, 6), params32(prenorm="map", spp="official"))
    with pytest.raises(ValueError, match="spp='official' needs \\(N, C, 7, 7\\)"):
        fv_vae_encode(torch.rand(2, 6, 4), params32(prenorm="map", spp="official"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(prenorm="layer"), r"prenorm must be one of"),
    (dict(spp="pyramid"), r"spp must be one of"),
    (dict(norm_scale=0.0), r"norm_scale must be a finite number"),
    (dict(norm_scale=float("inf")), r"norm_scale must be a finite number"),
])
def test_params_options_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        params32(**kwargs)


def test_params_shapes_rejected():
    good = params32()
    with pytest.raises(ValueError, match=r"encoder ends with 3 features but dec_weight .* expects d = 5"):
        FVVAEParams(good.encoder, torch.rand(4, 5), good.dec_bias, good.sigma_x)
    with pytest.raises(ValueError, match=r"encoder layer 0 weight must have shape \(out, 4\)"):
        FVVAEParams([(torch.rand(3, 5), torch.rand(3), False)], good.dec_weight, good.dec_bias, good.sigma_x)
    with pytest.raises(ValueError, match="sigma_x must be positive"):
        FVVAEParams(good.encoder, good.dec_weight, good.dec_bias, -good.sigma_x)
    with pytest.raises(ValueError, match=r"fisher must have shape \(C, d\+1\) = \(4, 4\)"):
        FVVAEParams(good.encoder, good.dec_weight, good.dec_bias, good.sigma_x, torch.rand(4, 3))
    with pytest.raises(TypeError, match="share one dtype and device"):
        FVVAEParams(good.encoder, good.dec_weight.double(), good.dec_bias, good.sigma_x)


def test_empty_batch_and_empty_lengths_list():
    z, x, w, b, s, f, _ = [t if t is None or not t.is_floating_point() else t[:0] if t.dim() == 3 else t
                           for t in problem32()]
    assert fvkernels.fv_accumulate(z, x, w, b, s, f, [], backend="torch").shape == (0, 4, 4)


def test_to_official_layout_rejects_zero_channels():
    with pytest.raises(ValueError, match="multiple of C = 0"):
        fvkernels.to_official_layout(torch.zeros(1, 8), 0)
