"""The unseen-degradation suite of evaluation/adaptation_bench.py: every operator is a deterministic function
of (image, seed), none is a registered family, and the two camera noises differ as their docstrings say."""

from __future__ import annotations

import pytest
import torch

from evaluation.adaptation_bench import DEGRADATIONS, degrade
from metarestore.degradations import names


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
