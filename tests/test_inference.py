"""Whole-image restoration (metarestore.inference.restore_image): a batch in bounded chunks is the same
restoration as in one pass, with or without tiles."""

from __future__ import annotations

import pytest
import torch

from metarestore.config import MetaConfig
from metarestore.inference import restore_image, self_ensemble
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


def test_a_cpu_caller_gets_cpu_results_from_the_models_device():
    """``restore`` and ``adapt`` take inputs on any device and run on the model's; restore answers on the
    input's device. On CPU (here) it is the identity; the CUDA test below runs it across devices."""
    learner = tiny_learner()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert learner.device.type == "cpu"
    params = learner.adapt(x, x.flip(-1), steps=1)
    assert restore_image(learner, x, params, tile=None).device == x.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_model_restores_and_adapts_cpu_images_like_the_cpu_model():
    from metarestore.inference import fit_bounded

    cpu = tiny_learner()
    gpu = tiny_learner().cuda()
    assert gpu.device.type == "cuda"
    x = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    y = (x * 0.8).clamp(0, 1)
    out = restore_image(gpu, x, tile=32, overlap=8)
    assert out.device.type == "cpu"
    assert (out - restore_image(cpu, x, tile=32, overlap=8)).abs().max().item() < 1e-4
    params = gpu.adapt(x, y, steps=2)
    assert all(p.device.type == "cuda" for p in params.values())
    reference = cpu.adapt(x, y, steps=2)
    assert max((params[n].cpu() - reference[n]).abs().max().item() for n in reference) < 1e-4
    adapter = fit_bounded(gpu, x, y, kind="decoder", steps=2, patch=None)
    assert adapter.restore(x).device.type == "cpu"


def test_self_ensemble_undoes_every_rotation_and_flip():
    """A restorer that returns its input gives the image back (every transform undone, a non-square image's
    sides swapped and restored); one that marks the top-left pixel of what it is given marks each of the
    four corners twice: the eight transforms are the eight distinct ones, each mapped back."""
    x = torch.rand(1, 3, 6, 10, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(self_ensemble(lambda t: t, x), x, rtol=0, atol=1e-6)

    def mark(t):
        t = t.clone()
        t[..., 0, 0] += 8
        return t

    out = self_ensemble(mark, torch.zeros(1, 1, 6, 10))
    assert torch.equal(out[0, 0, [0, 0, -1, -1], [0, -1, 0, -1]], torch.full((4,), 2.0))
    assert out.sum() == 8


def test_the_ensemble_restoration_is_rotation_equivariant_and_not_the_single_pass():
    learner = tiny_learner()
    with torch.no_grad():  # a fresh network is the identity (zero-initialised residuals): give it a shape
        for p in learner.model.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(4))
    ensembled = restore_image(learner, x, tile=None, ensemble=True)
    turned = restore_image(learner, torch.rot90(x, 1, (-2, -1)), tile=None, ensemble=True)
    torch.testing.assert_close(torch.rot90(turned, -1, (-2, -1)), ensembled, rtol=1e-5, atol=1e-6)
    single = restore_image(learner, x, tile=None)
    assert not torch.allclose(ensembled, single, atol=1e-4)
    assert restore_image(learner, x, tile=16, overlap=4, ensemble=True).shape == x.shape  # per tile


def test_the_served_fit_is_the_servers_default_fit():
    """The showcase and ``evaluate --adapter auto`` fit held-out families with ``fit_as_served``: the same
    ``fit_bounded`` arguments a server with default settings passes (``serving/core.py``), so they show the
    product; a changed server default must change them too."""
    from metarestore.inference import SERVED_FIT, SERVED_MEMORY_MB, SERVED_STEPS
    from serving.settings import AppArgs

    args = AppArgs()
    assert SERVED_FIT == {"max_side": args.adapt_side, "max_folds": args.adapt_folds,
                          "validation_steps": args.adapt_validation_steps, "budget_s": args.adapt_budget_s,
                          "score_side": args.adapt_score_side, "patch": args.adapt_patch}
    assert (SERVED_STEPS, SERVED_MEMORY_MB, args.auto_paths) == (args.adapt_steps, args.adapt_memory_mb, None)
