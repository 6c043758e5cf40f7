"""Per-descriptor FV contributions against summing each descriptor's own term."""
import torch

from fvkernels import fv_vae_encode
from fvkernels.evaluation.attention import descriptor_contributions

from tests.helpers import random_params, relative_error


def test_contributions_are_each_descriptors_share():
    params = random_params(7, 4, prenorm="descriptor", norm_scale=2.0)
    maps = torch.rand(2, 7, 3, 5, dtype=torch.float64)
    mass = descriptor_contributions(maps, params)
    assert mass.shape == (2, 15)
    descriptors = maps.flatten(2).transpose(1, 2)
    for n in range(2):
        for t in range(15):
            alone = fv_vae_encode(descriptors[n: n + 1, t: t + 1], params, normalize=False)
            assert relative_error(mass[n, t], alone.abs().sum()) <= 1e-10
    total = fv_vae_encode(maps, params, normalize=False)
    assert (mass.sum(1) >= total.abs().sum(1) * (1 - 1e-12)).all(), "triangle inequality"
