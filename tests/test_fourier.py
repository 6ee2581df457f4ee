"""The FFT path of ``convolve`` (large kernels) equals the direct convolution it replaces."""

import pytest
import torch
import torch.nn.functional as F

from metarestore.degradations._ops import pad_mode
from metarestore.operators.fourier import DIRECT_MAX, convolve


def _direct(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    pad = kernel.shape[-1] // 2
    xp = F.pad(x, (pad,) * 4, mode=pad_mode(x, pad))
    return F.conv2d(xp, kernel.flip(-2, -1)[:, None], groups=x.shape[1])


@pytest.mark.parametrize("size", [DIRECT_MAX + 2, 15, 31])
def test_fft_convolution_equals_the_direct_one(size):
    g = torch.Generator().manual_seed(size)
    x = torch.rand(2, 3, 70, 45, generator=g, dtype=torch.float64)  # odd, non-square: no wrap-around hides
    kernel = torch.rand(3, size, size, generator=g, dtype=torch.float64)  # asymmetric: a flip would show
    assert torch.allclose(convolve(x, kernel), _direct(x, kernel), atol=1e-10)
    shared = kernel[0]
    assert torch.allclose(convolve(x.float(), shared), _direct(x, shared.expand(3, -1, -1)).float(), atol=1e-5)
