"""Whole-image restoration (metarestore.inference.restore_image): a batch in bounded chunks is the same
restoration as in one pass, with or without tiles."""

from __future__ import annotations

import pytest
import torch

from metarestore.config import MetaConfig
from metarestore.inference import restore_image
from metarestore.meta import MetaLearner, make_learner
from metarestore.model import RestorationNet


def tiny_learner() -> MetaLearner:
    torch.manual_seed(0)
    model = RestorationNet(width=4, enc_blocks=(1,), middle_blocks=1, dec_blocks=(1,), adapt="decoder")
    return make_learner(model, MetaConfig(algorithm="fomaml", inner_steps=1, inner_lr={"default": 0.05})).eval()


class Recording:
    """The learner, recording the batch shape of every forward pass it runs."""

    def __init__(self, learner: MetaLearner):
        self.learner, self.passes = learner, []

    def restore(self, x, params=None, kind=None):
        self.passes.append(tuple(x.shape))
        return self.learner.restore(x, params, kind=kind)


@pytest.mark.parametrize(("size", "tile", "max_batch_pixels", "per_pass"), [
    (32, None, 2 * 32 * 32, 2),     # whole images, two per pass
    (32, None, 100, 1),             # a bound below one image still makes progress, one at a time
    (48, 32, 3 * 32 * 32, 3),       # tiled: the bound counts the pixels of one tile
])
def test_a_batch_in_chunks_is_the_same_restoration(size, tile, max_batch_pixels, per_pass):
    learner = tiny_learner()
    x = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    whole = Recording(learner)
    expected = restore_image(whole, x, tile=tile, overlap=8)
    chunked = Recording(learner)
    got = restore_image(chunked, x, tile=tile, overlap=8, max_batch_pixels=max_batch_pixels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert max(shape[0] for shape in whole.passes) == 5  # without the bound, the batch went through at once
    assert max(shape[0] for shape in chunked.passes) == per_pass
    assert sum(shape[0] for shape in chunked.passes) == sum(shape[0] for shape in whole.passes)  # every image


def test_chunks_keep_an_adapted_state():
    learner = tiny_learner()
    g = torch.Generator().manual_seed(2)
    support_x, support_y = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    params = learner.adapt(support_x, support_y, steps=1)
    x = torch.rand(4, 3, 16, 16, generator=g)
    expected = restore_image(learner, x, params, tile=None)
    assert not torch.allclose(expected, restore_image(learner, x, tile=None))  # the state matters here
    torch.testing.assert_close(restore_image(learner, x, params, tile=None, max_batch_pixels=16 * 16), expected,
                               rtol=1e-5, atol=1e-6)
