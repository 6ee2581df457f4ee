"""The unseen-degradation suite of evaluation/adaptation_bench.py: every operator is a deterministic function
of (image, seed), none is a registered family, the control rows are what a registry chain makes, and the two
camera noises differ as their docstrings say."""

from __future__ import annotations

import pytest
import torch

from evaluation.adaptation_bench import DEGRADATIONS, IN_TRAINING_SPAN, degrade
from metarestore.degradations import get, names


def crops() -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    return torch.stack([torch.stack([x, y, 0.5 * (x + y)]), torch.stack([1 - x, y * x, 0.3 + 0 * x])])


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_an_operator_is_a_seeded_function_that_changes_the_image(name):
    x = crops()
    a, b, c = degrade(name, x, seed=1), degrade(name, x, seed=1), degrade(name, x, seed=2)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert (a - x).abs().mean() > 1e-3
    assert name not in names()
    if name in ("camera_noise", "raw_camera"):
        assert not torch.equal(a, c)


def test_raw_camera_noise_is_correlated_across_pixels_where_camera_noise_is_not():
    x = torch.full((4, 3, 64, 64), 0.5)
    for name, low, high in (("camera_noise", -0.1, 0.1), ("raw_camera", 0.3, 1.0)):
        n = degrade(name, x, seed=3).double() - 0.5
        corr = (n[..., 1:] * n[..., :-1]).mean() / n.pow(2).mean()  # neighbours along a row
        assert low < float(corr) < high, (name, float(corr))


def test_the_control_rows_are_what_their_registry_chain_makes():
    """camera_noise has the noise of poisson_noise (peak 1/0.012) then gaussian_noise (sigma 0.02): the same
    variance at every brightness, within sampling error."""
    for name, chain in IN_TRAINING_SPAN.items():
        family = get(chain)
        assert name == "camera_noise" and [m.name for m in family.members] == ["poisson_noise", "gaussian_noise"]
        for level in (0.25, 0.5, 0.7):  # away from 0 and 1, where clipping shapes the two differently
            x = torch.full((8, 3, 64, 64), level)
            ours = (degrade(name, x, seed=4).double() - level).var()
            params = {"chain": [{"peak": 1 / 0.012, "seed": 5}, {"sigma": 0.02, "seed": 6}]}
            theirs = (family(x.double(), params).clamp(0, 1) - level).var()
            assert abs(float(ours / theirs) - 1) < 0.05, (level, float(ours), float(theirs))
        assert family.members[0].specs["peak"].high <= 1 / 0.012 <= family.members[0].specs["peak"].low
        assert family.members[1].specs["sigma"].low <= 0.02 <= family.members[1].specs["sigma"].high
