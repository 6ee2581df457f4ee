"""The network's building blocks against their textbook definitions."""

from __future__ import annotations

import torch

from metarestore.model.blocks import LayerNorm2d


def _textbook(x: torch.Tensor, norm: LayerNorm2d) -> torch.Tensor:
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)


def test_layer_norm_normalises_the_channels_of_each_pixel_with_first_and_second_order_gradients():
    torch.manual_seed(0)
    norm = LayerNorm2d(5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.3, 0.3)
    x = (torch.randn(2, 5, 7, 3, dtype=torch.float64) * 3 + 1).requires_grad_()
    out, want = norm(x), _textbook(x, norm)
    assert out.shape == x.shape
    torch.testing.assert_close(out, want)
    # gradients, and gradients of gradients (MAML differentiates through the inner step)
    params = [x, norm.weight, norm.bias]
    got = torch.autograd.grad((out * out.detach().flip(-1)).sum(), params, create_graph=True)
    ref = torch.autograd.grad((want * want.detach().flip(-1)).sum(), params, create_graph=True)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r)
    torch.testing.assert_close(torch.autograd.grad(got[0].square().sum(), norm.weight)[0],
                               torch.autograd.grad(ref[0].square().sum(), norm.weight)[0])


def test_layer_norm_under_vmap_equals_the_plain_one():
    """The batched meta-step runs the network under vmap, where the layer norm takes its textbook form."""
    torch.manual_seed(1)
    norm = LayerNorm2d(4).double()
    x = torch.randn(3, 2, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(norm)(x), torch.stack([norm(t) for t in x]))
