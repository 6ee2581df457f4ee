"""Blur kernel identification: the convolution kernel that best maps the clean support images onto the
degraded ones, in closed form in the Fourier domain.

With K pairs (clean c_i, degraded d_i) and a Tikhonov weight lambda, per frequency
``K = sum_i conj(C_i) D_i / (sum_i |C_i|^2 + lambda)`` is the least-squares kernel over the whole
periodic plane. To make that plane a good model of images with borders, both images of a pair have their
means removed and are multiplied by the same edge taper (flat interior, cosine ramps a kernel wide); the
kernel is then cropped to its support, clipped at zero (blur and optics kernels are non-negative) and
normalised to unit sum (a global gain belongs to the tone model).

The fitted kernel is the ``kernel`` operator: the paths ``deconv`` (Tikhonov, closed form), ``hqs`` (that
deconvolution refined with the restorer as the prior), ``wiener`` and ``rl`` (the classical ones, with no
restorer after) undo it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metarestore.operators.base import Operator, register_operator, stored
from metarestore.operators.classical import deconvolve_per_channel
from metarestore.operators.fourier import convolve, deconvolve, otf_to_kernel, taper

MAX_KERNEL = 31
LAMBDAS = (1e-4, 1e-3, 1e-2)
IDENTITY_TAP = 0.9  # a unit-sum kernel with at least this much weight on its centre tap blurs nothing


@register_operator("kernel")
@dataclass
class KernelFit(Operator):
    kernel: torch.Tensor  # (k, k) shared, or (C, k, k) per channel; float64, unit sum per channel
    residual: float  # relative RMS misfit |k * c - d| / |d - mean d| on the interior of the support pairs

    pre_steps = ("deconv", "hqs", "wiener", "rl")
    classical = ("wiener", "rl")
    refines = {"hqs": "deconv", "rl": "deconv"}

    @classmethod
    def fit(cls, clean: torch.Tensor, degraded: torch.Tensor) -> KernelFit:
        return fit_kernel(clean, degraded)

    @property
    def size(self) -> int:
        return int(self.kernel.shape[-1])

    def apply(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return convolve(clean, self.kernel)

    def predict(self, clean: torch.Tensor) -> torch.Tensor:
        return self.apply(clean)

    def restore(self, x: torch.Tensor, path=None, learner=None) -> torch.Tensor:
        pre, balance = (path.pre, path.balance) if path is not None else ("deconv", 0.01)
        if pre == "hqs":
            return hqs(x, self.kernel, learner, balance)
        if pre in self.classical:
            return deconvolve_per_channel(x, self.kernel, pre, balance)
        return deconvolve(x, self.kernel, balance)

    @property
    def identity(self) -> bool:
        """Whether the kernel is (nearly) the identity in every channel: there is no blur to undo, and a
        deconvolution with it can only smooth (a colour cast or noise fits such a kernel)."""
        r = self.size // 2
        centre = self.kernel[..., r, r] / self.kernel.sum(dim=(-2, -1)).clamp(min=1e-12)
        return bool((centre >= IDENTITY_TAP).all())

    @property
    def cannot_help(self) -> bool:
        return self.identity

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"kernel": stored(self.kernel)}

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor], header: dict, residual: float, learner) -> KernelFit | None:
        if "kernel" not in tensors:
            return None
        k = tensors["kernel"].double()
        if k.ndim not in (2, 3) or k.shape[-1] != k.shape[-2] or k.shape[-1] % 2 == 0 or k.shape[-1] > MAX_KERNEL:
            raise ValueError(f"bad kernel shape {tuple(k.shape)}")
        return cls(k, residual)


def hqs(y: torch.Tensor, kernel: torch.Tensor, learner, balance: float, iters: int = 4) -> torch.Tensor:
    """Half-quadratic splitting, ``min_x |k * x - y|^2 + prior(x)``: alternate the closed-form Fourier
    data step ``argmin |k * x - y|^2 + mu |x - z|^2`` and ``z = restorer(x)``. The restorer is blind (no
    noise-level input), so the coupling mu grows geometrically (0.03 -> 1) instead of following a noise
    schedule; the start is the Tikhonov deconvolution."""
    x = deconvolve(y, kernel, balance).clamp(0, 1)
    for mu in np.geomspace(0.03, 1.0, iters):
        z = learner.restore(x)
        x = deconvolve(y, kernel, balance * 0.1, prior=z, weight=float(mu)).clamp(0, 1)
    return x


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
