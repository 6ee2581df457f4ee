"""The classical deconvolutions, Wiener and Richardson-Lucy (scikit-image), per channel: the adapter's
``wiener`` and ``rl`` paths and the evaluation's non-blind baselines run this one function.

scikit-image's FFT methods assume periodic borders, so each channel is deconvolved on an edge-padded copy,
padded by twice the kernel's size (the evaluation baselines' padding; the adapter's paths padded by one
kernel size, which costs Richardson-Lucy up to 5.7 dB and Wiener up to 1.4 dB on motion blur: the border's
error creeps inwards a kernel radius per iteration), then cropped back."""

from __future__ import annotations

import numpy as np
import torch

METHODS = ("wiener", "rl")
RL_ITERATIONS = 30
PAD_KERNELS = 2  # edge padding, in kernel sizes


def deconvolve_per_channel(x: torch.Tensor, kernel: torch.Tensor | np.ndarray, method: str,
                           balance: float = 0.0, iterations: int = RL_ITERATIONS) -> torch.Tensor:
    """Wiener (``balance``: its Laplacian regulariser's weight) or Richardson-Lucy (``iterations``, on the
    image clipped to [0, 1]) deconvolution of every channel of a (B, C, H, W) batch with a (k, k) kernel
    (a per-channel (C, k, k) one is averaged over channels); not clipped afterwards."""
    from skimage.restoration import richardson_lucy, wiener

    if method not in METHODS:
        raise ValueError(f"unknown classical deconvolution {method!r} (known: {', '.join(METHODS)})")
    psf = kernel.double().cpu().numpy() if torch.is_tensor(kernel) else np.asarray(kernel, dtype=np.float64)
    if psf.ndim == 3:
        psf = psf.mean(0)
    pad = PAD_KERNELS * psf.shape[0]
    out = np.empty(tuple(x.shape), dtype=np.float64)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            image = np.pad(x[b, c].double().cpu().numpy(), pad, mode="edge")
            if method == "wiener":
                res = wiener(image, psf, balance=balance, clip=False)
            else:
                res = richardson_lucy(np.clip(image, 0, 1), psf, num_iter=iterations, clip=False)
            out[b, c] = res[pad:-pad, pad:-pad]
    return torch.from_numpy(out).to(x)
