"""Evidence a file gives for free: a JPEG file's quantization tables say it is JPEG and at what quality,
and an image's noise level can be measured."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# The IJG (libjpeg) luminance table at quality 50, the base every libjpeg-style encoder scales
_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64)


def ijg_table(quality: int) -> np.ndarray:
    """The luminance table libjpeg writes at ``quality`` (1..100), baseline (entries 1..255)."""
    quality = min(100, max(1, int(quality)))
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((_IJG_LUMA * scale + 50) / 100), 1, 255)


_SORTED = {q: np.sort(ijg_table(q)) for q in range(1, 101)}


def jpeg_quality(data: bytes | None) -> int | None:
    """The quality (1..100) a JPEG file was saved at, read from its luminance quantization table as the
    nearest libjpeg quality (the table is compared sorted, so zigzag or natural order does not matter, and
    an encoder with tables of its own gets the libjpeg quality closest to them); ``None`` for anything that
    is not a JPEG file."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                return None
            tables = getattr(im, "quantization", None) or {}
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    if not tables:
        return None
    luma = np.sort(np.asarray(tables[min(tables)], dtype=np.float64))
    return min(_SORTED, key=lambda q: (np.abs(_SORTED[q] - luma).sum(), -q))


def noise_sigma(image: torch.Tensor) -> float:
    """The standard deviation of white Gaussian noise in ``image`` ((3, H, W) or (1, 3, H, W), float in
    [0, 1] or uint8), in 8-bit levels: scikit-image's wavelet estimator (Donoho's median absolute deviation
    of the finest diagonal detail band), averaged over the channels."""
    from skimage.restoration import estimate_sigma

    if image.ndim == 4:
        image = image[0]
    x = image.detach().to("cpu", torch.float32)
    if image.dtype == torch.uint8:
        x = x / 255.0
    array = x.permute(1, 2, 0).numpy()
    return float(estimate_sigma(array, channel_axis=-1, average_sigmas=True)) * 255.0


def tone_span(image: torch.Tensor) -> float:
    """How far an image's values reach from their mean towards black and towards white, as a fraction of the
    way (the larger side): 1.0 when they reach either end. The ``contrast`` family (``m + f * (x - m)``, ``m``
    the mean) leaves at most its factor ``f``, whatever the photo, while a photo's values nearly always reach
    an end (the least over 275 clean 256 px crops of CBSD68, Kodak24, LIVE1 and Set14 and 140 whole photos:
    0.77; docs/benchmarks.md, "Blind restoration"). ``image``: (3, H, W) or (1, 3, H, W), float in [0, 1]."""
    x = image.detach().float()
    mean, low, high = float(x.mean()), float(x.amin()), float(x.amax())
    return max((mean - low) / max(mean, 1e-3), (high - mean) / max(1.0 - mean, 1e-3))


def resampling_peak(image: torch.Tensor, low: float = 0.2) -> float:
    """How periodic an image's fine detail is along both axes at once: resampling (a picture enlarged by
    interpolation, the ``downsample`` family's bicubic way back up included) leaves its pixels' second
    differences periodic with the scale's period (Gallagher, "Detection of linear and cubic interpolation
    in JPEG compressed images", 2005; Popescu and Farid, 2005), a blur does not. The mean absolute second
    difference of each row (column) position is a signal across the image; the peak, from ``low`` cycles
    per pixel to 0.5 (periods 2 to 5: factors 2 to 5), of the smaller of the two axes' spectra, each
    against its median. About 1 to 3.6 for photos and blurred photos, 3 to 25 for resampled ones
    (docs/benchmarks.md, "Blind restoration"). ``image``: (3, H, W) or (1, 3, H, W), float."""
    gray = image.detach().double().reshape(-1, *image.shape[-2:]).mean(0)
    if min(gray.shape) < 16:
        return 0.0
    n = min(gray.shape)
    spectra = []
    for axis in (0, 1):
        d2 = torch.diff(gray, n=2, dim=axis).abs().mean(dim=1 - axis)[: n - 2]
        d2 = (d2 - d2.mean()) * torch.hann_window(len(d2), periodic=False, dtype=d2.dtype)
        spectrum = torch.fft.rfft(d2).abs()
        spectra.append(spectrum / spectrum[1:].median().clamp_min(1e-12))
    freq = torch.fft.rfftfreq(n - 2, dtype=torch.float64)
    band = freq >= low
    return float(torch.minimum(*spectra)[band].max())


def highlights(image: torch.Tensor) -> float:
    """How bright an image's highlights are: the 99.5th percentile of each pixel's brightest channel. An
    under-exposed picture's stay at its exposure (the ``low_light`` family at severity 0.5: at most 0.65),
    where nine photos in ten reach 0.8 (docs/benchmarks.md, "Blind restoration"). ``image``: (3, H, W) or
    (1, 3, H, W), float in [0, 1]."""
    brightest = image.detach().float().reshape(-1, *image.shape[-2:]).amax(0).flatten()
    if not brightest.numel():
        return 0.0
    # a histogram's percentile (1/1024 wide bins): torch.quantile refuses more than 2^24 values (a 24 MP photo)
    counts = torch.histc(brightest.clamp(0, 1), bins=1024, min=0.0, max=1.0).cumsum(0)
    return float(torch.searchsorted(counts, 0.995 * counts[-1]).clamp(max=1023) + 1) / 1024
