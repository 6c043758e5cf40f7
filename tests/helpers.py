"""Random problems for the tests: descriptor sets, decoder parameters and FVVAEParams."""
import torch

from fvkernels import FVVAEParams


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
