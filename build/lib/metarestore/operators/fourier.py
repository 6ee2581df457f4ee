"""Fourier-domain helpers for the operator fits: windows, kernel <-> transfer function, boundary-free
convolution and the closed-form deconvolution / data steps.

Everything works on (B, C, H, W) tensors in float64 (spectral divisions in float32 lose the small
frequencies that matter for deconvolution). Images are mirror-extended to twice their size before an
FFT: the extension is periodic without jumps, so circular convolution matches the symmetric padding
the degradations use and no ringing starts at the borders.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metarestore.degradations._ops import pad_mode

DIRECT_MAX = 7  # kernel sizes convolved directly; larger ones cost less through the FFT


def taper(height: int, width: int, border: int, device=None) -> torch.Tensor:
    """A (H, W) window, 1 in the interior and a raised-cosine ramp ``border`` pixels wide at the edges:
    multiplying both images of a pair by it removes the FFT's wrap-around jumps while leaving the
    convolution relation intact away from the ramps."""
    def ramp(n: int) -> torch.Tensor:
        b = max(1, min(border, n // 4))
        w = torch.ones(n, dtype=torch.float64, device=device)
        t = (torch.arange(b, dtype=torch.float64, device=device) + 0.5) / b
        edge = 0.5 - 0.5 * torch.cos(math.pi * t)
        w[:b] = edge
        w[n - b:] = edge.flip(0)
        return w
    return ramp(height)[:, None] * ramp(width)[None, :]


def kernel_to_otf(kernel: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Transfer function of a centred (C, k, k) or (k, k) kernel on an (H, W) periodic grid: the kernel
    is zero-padded and rolled so that its centre sits at the origin."""
    kernel = kernel.to(torch.float64)
    if kernel.ndim == 2:
        kernel = kernel[None]
    k = kernel.shape[-1]
    padded = kernel.new_zeros(kernel.shape[0], height, width)
    padded[:, :k, :k] = kernel
    padded = torch.roll(padded, shifts=(-(k // 2), -(k // 2)), dims=(-2, -1))
    return torch.fft.fft2(padded)


def otf_to_kernel(otf: torch.Tensor, size: int) -> torch.Tensor:
    """The centred ``size`` x ``size`` crop of the impulse response of ``otf`` (..., H, W)."""
    impulse = torch.fft.ifft2(otf).real
    impulse = torch.roll(impulse, shifts=(size // 2, size // 2), dims=(-2, -1))
    return impulse[..., :size, :size]


def mirror(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 2H, 2W): the image and its mirror images, a jump-free periodic tile."""
    top = torch.cat([x, x.flip(-1)], dim=-1)
    return torch.cat([top, top.flip(-2)], dim=-2)


def laplacian_otf(height: int, width: int, device=None) -> torch.Tensor:
    lap = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]], dtype=torch.float64,
                       device=device)
    return kernel_to_otf(lap, height, width)[0]


def convolve(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Same-size convolution of (B, C, H, W) with a (k, k) or per-channel (C, k, k) kernel, reflect
    padding (as the degradation families pad)."""
    channels = x.shape[1]
    if kernel.ndim == 2:
        kernel = kernel[None].expand(channels, -1, -1)
    k = kernel.shape[-1]
    pad = k // 2
    xp = F.pad(x.to(torch.float64), (pad, pad, pad, pad), mode=pad_mode(x, pad))
    kernel = kernel.to(x.device, torch.float64)
    if k <= DIRECT_MAX:
        # conv2d is a correlation: flip the kernel so that this is a true convolution, like the FFT's
        return F.conv2d(xp, kernel.flip(-2, -1)[:, None], groups=channels).to(x.dtype)
    # Large kernels (fitted ones are up to 31 px) through the FFT: a circular convolution of the padded
    # image, whose samples from k - 1 on never wrap around, are exactly the valid part of the direct one.
    size = xp.shape[-2:]
    full = torch.fft.irfft2(torch.fft.rfft2(xp) * torch.fft.rfft2(kernel, s=size), s=size)
    return full[..., k - 1:, k - 1:].to(x.dtype)


def deconvolve(y: torch.Tensor, kernel: torch.Tensor, balance: float, prior: torch.Tensor | None = None,
               weight: float = 0.0) -> torch.Tensor:
    """Tikhonov deconvolution in closed form, per channel:
    ``argmin_x |k * x - y|^2 + balance |laplacian x|^2 + weight |x - prior|^2``.

    ``weight = 0``: a Wiener-style deconvolution with a smoothness regulariser; ``weight > 0`` with a
    ``prior`` image: the data step of half-quadratic splitting."""
    h, w = y.shape[-2:]
    Y = torch.fft.fft2(mirror(y.to(torch.float64)))
    K = kernel_to_otf(kernel.to(y.device), 2 * h, 2 * w)
    L = laplacian_otf(2 * h, 2 * w, device=y.device)
    num = K.conj() * Y
    den = K.abs() ** 2 + balance * L.abs() ** 2
    if weight > 0 and prior is not None:
        num = num + weight * torch.fft.fft2(mirror(prior.to(torch.float64)))
        den = den + weight
    x = torch.fft.ifft2(num / den).real[..., :h, :w]
    return x.to(y.dtype)
