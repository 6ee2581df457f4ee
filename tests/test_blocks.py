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


def test_under_bf16_autocast_the_image_facing_convolutions_stay_float32():
    """A bf16 copy of the image keeps 8 bits of mantissa: the base run's told contrast (37 dB) fell to 26-31 dB
    within 200-500 steps of bf16 autocast, and held with the first and last convolutions in float32."""
    from metarestore.model.network import RestorationNet

    net = RestorationNet(width=8, enc_blocks=(1, 1), middle_blocks=1, dec_blocks=(1, 1))
    torch.nn.init.normal_(net.ending.weight, std=0.1)
    seen = {}
    def record(name):
        def hook(module, inputs, output):
            seen[name] = (inputs[0].dtype, output.dtype)
        return hook

    for name, module in {"intro": net.intro, "ending": net.ending, "down": net.downs[0]}.items():
        module.register_forward_hook(record(name))
    x = torch.rand(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert seen["intro"] == (torch.float32, torch.float32) and seen["ending"][1] == torch.float32
    assert seen["down"][1] == torch.bfloat16  # the rest does run in bf16
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, net(x), atol=0.05, rtol=0)  # the same function, to bf16's rounding
