"""Blur kernel identification: the convolution kernel that best maps the clean support images onto the
degraded ones, in closed form in the Fourier domain.

With K pairs (clean c_i, degraded d_i) and a Tikhonov weight lambda, per frequency
``K = sum_i conj(C_i) D_i / (sum_i |C_i|^2 + lambda)`` is the least-squares kernel over the whole
periodic plane. To make that plane a good model of images with borders, both images of a pair have their
means removed and are multiplied by the same edge taper (flat interior, cosine ramps a kernel wide); the
kernel is then cropped to its support, clipped at zero (blur and optics kernels are non-negative) and
normalised to unit sum (a global gain belongs to the tone model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metarestore.operators.fourier import convolve, otf_to_kernel, taper

MAX_KERNEL = 31
LAMBDAS = (1e-4, 1e-3, 1e-2)
IDENTITY_TAP = 0.9  # a unit-sum kernel with at least this much weight on its centre tap blurs nothing


@dataclass
class KernelFit:
    kernel: torch.Tensor  # (k, k) shared, or (C, k, k) per channel; float64, unit sum per channel
    residual: float  # relative RMS misfit |k * c - d| / |d - mean d| on the interior of the support pairs

    @property
    def size(self) -> int:
        return int(self.kernel.shape[-1])

    def apply(self, clean: torch.Tensor) -> torch.Tensor:
        return convolve(clean, self.kernel)

    @property
    def identity(self) -> bool:
        """Whether the kernel is (nearly) the identity in every channel: there is no blur to undo, and a
        deconvolution with it can only smooth (a colour cast or noise fits such a kernel)."""
        r = self.size // 2
        centre = self.kernel[..., r, r] / self.kernel.sum(dim=(-2, -1)).clamp(min=1e-12)
        return bool((centre >= IDENTITY_TAP).all())


def _check_pairs(clean: torch.Tensor, degraded: torch.Tensor) -> None:
    if clean.shape != degraded.shape or clean.ndim != 4:
        raise ValueError(f"support pairs must be two (K, C, H, W) batches of one shape, got "
                         f"{tuple(clean.shape)} and {tuple(degraded.shape)}")


def fit_kernel(clean: torch.Tensor, degraded: torch.Tensor, size: int = MAX_KERNEL, lam: float | None = None,
               per_channel: bool = False, nonneg: bool = True, floor: float = 0.05) -> KernelFit:
    """Least-squares convolution kernel (odd ``size`` <= 31, shrunk to a quarter of the smaller image
    side) with ``degraded ~= kernel * clean``; ``lam`` is relative to the mean spectral energy (None: the
    one of 1e-4, 1e-3, 1e-2 with the smallest residual; kernels with spectral zeros, like a defocus
    disc, need more regularisation than smooth ones), ``floor``
    (with ``nonneg``) the fraction of the peak below which entries are set to zero."""
    _check_pairs(clean, degraded)
    h, w = clean.shape[-2:]
    size = min(int(size), MAX_KERNEL, (min(h, w) // 4) | 1)
    size = size if size % 2 else size - 1
    window = taper(h, w, border=size, device=clean.device)
    c = clean.to(torch.float64)
    d = degraded.to(torch.float64)
    c = (c - c.mean(dim=(-2, -1), keepdim=True)) * window
    d = (d - d.mean(dim=(-2, -1), keepdim=True)) * window
    C, D = torch.fft.fft2(c), torch.fft.fft2(d)
    reduce = (0,) if per_channel else (0, 1)
    num = (C.conj() * D).sum(dim=reduce)
    den = (C.abs() ** 2).sum(dim=reduce)
    fits = []  # the spectra are the same for every lambda: only the division and the residual differ
    for value in (LAMBDAS if lam is None else (lam,)):
        kernel = otf_to_kernel(num / (den + value * den.mean()), size)  # (C, k, k) or (k, k)
        if nonneg:
            # entries under ``floor`` x the peak are the noise floor of the estimate spread over the whole
            # window: zeroing them keeps the kernel's true support
            peak = kernel.amax(dim=(-2, -1), keepdim=True)
            kernel = torch.where(kernel >= floor * peak, kernel, torch.zeros_like(kernel)) * _main_blob(kernel)
        kernel = kernel / kernel.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-12)
        fits.append(KernelFit(kernel, kernel_residual(kernel, clean, degraded)))
    return min(fits, key=lambda fit: fit.residual)  # ties keep the smaller lambda, as before


def _main_blob(kernel: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask of the connected non-zero region around each kernel's peak: blur kernels are one
    connected blob, isolated specks are estimation noise."""
    from scipy import ndimage

    flat = kernel.reshape(-1, *kernel.shape[-2:]).cpu().numpy()
    masks = []
    for k in flat:
        labels, _ = ndimage.label(k > 0, structure=np.ones((3, 3)))
        masks.append(labels == labels[np.unravel_index(np.argmax(k), k.shape)])
    return torch.from_numpy(np.stack(masks).reshape(kernel.shape)).to(kernel)


def kernel_residual(kernel: torch.Tensor, clean: torch.Tensor, degraded: torch.Tensor) -> float:
    """Relative RMS misfit on the interior (a kernel radius from the borders, where padding decides)."""
    r = kernel.shape[-1] // 2
    pred = convolve(clean.to(torch.float64), kernel)
    d = degraded.to(torch.float64)
    if r and min(d.shape[-2:]) > 4 * r:
        pred, d = pred[..., r:-r, r:-r], d[..., r:-r, r:-r]
    spread = (d - d.mean(dim=(-2, -1), keepdim=True)).square().mean().sqrt().clamp(min=1e-12)
    return float((pred - d).square().mean().sqrt() / spread)
