"""JPEG identification: which codec setting turned the clean support images into the degraded ones.

A grid search with a real codec (Pillow's libjpeg): every quality factor and chroma subsampling is tried on
the clean pairs, and the one whose output is closest to the degraded pairs wins. The residual (RMS
distance of the best re-encoding from the degraded pairs, relative to the degradation's own RMS size)
says whether the pairs are JPEG at all: 0 for the same encoder, small for another libjpeg-like one, near
1 for something else. A good fit can re-encode any clean image the same way, which is what
``synthetic.train_on_synthetic`` needs to make many training pairs from a few: the fit is the ``jpeg``
operator, whose path ``jpeg`` restores with the network retrained on such pairs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from metarestore.operators.base import register_operator
from metarestore.operators.synthetic import SyntheticOperator
from metarestore.pixels import to_uint8

QUALITIES = tuple(range(1, 101))
SUBSAMPLINGS = (0, 1, 2)  # Pillow's codes: 4:4:4, 4:2:2, 4:2:0
GOOD_FIT = 0.5  # a residual below this: the pairs are this codec's output


def encode_decode(x: torch.Tensor, quality: int, subsampling: int) -> torch.Tensor:
    """JPEG round trip of a (B, C, H, W) batch in [0, 1] (1 or 3 channels) with Pillow."""
    from PIL import Image

    out = []
    for image in x:
        arr = to_uint8(image).permute(1, 2, 0).numpy()  # (H, W, C), as an image file holds it
        buf = io.BytesIO()
        pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        pil.save(buf, format="JPEG", quality=int(quality), subsampling=int(subsampling))
        dec = np.asarray(Image.open(buf)).astype(np.float64) / 255
        out.append(torch.from_numpy(dec.reshape(*arr.shape[:2], -1)).permute(2, 0, 1))
    return torch.stack(out).to(x.dtype)


@register_operator("jpeg")
@dataclass
class JpegFit(SyntheticOperator):
    quality: int
    subsampling: int
    residual: float  # RMS misfit of the re-encoded clean pairs, relative to the degradation's RMS size

    pre_steps = ("jpeg",)

    @classmethod
    def fit(cls, clean: torch.Tensor, degraded: torch.Tensor) -> JpegFit:
        return fit_jpeg(clean, degraded).keep(clean)

    @property
    def good(self) -> bool:
        return self.residual < GOOD_FIT

    def apply(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return encode_decode(clean, self.quality, self.subsampling)

    def predict(self, clean: torch.Tensor) -> torch.Tensor:
        return self.apply(clean)

    def as_dict(self) -> dict:
        return {"quality": self.quality, "subsampling": self.subsampling, "residual": self.residual}

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor], header: dict, residual: float, learner) -> JpegFit | None:
        if not header:
            return None
        try:
            fit = cls(int(header["quality"]), int(header["subsampling"]), float(header["residual"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad synthetic operator header: {exc}") from None
        if not (1 <= fit.quality <= 100 and fit.subsampling in (0, 1, 2)):
            raise ValueError("bad synthetic operator header: bad JPEG setting")
        return fit.read_network(tensors, learner)


def fit_jpeg(clean: torch.Tensor, degraded: torch.Tensor) -> JpegFit:
    """The quality factor and chroma subsampling (4:4:4 only for one channel) that best explain the pairs;
    the quality is searched coarsely (every 5th) and then around the best coarse value."""
    size = max(float((degraded.double() - clean.double()).square().mean().sqrt()), 1e-12)
    subsamplings = SUBSAMPLINGS if clean.shape[1] == 3 else (0,)
    cache: dict[tuple[int, int], float] = {}

    def misfit(q: int, s: int) -> float:
        if (q, s) not in cache:
            cache[(q, s)] = float((encode_decode(clean, q, s).double() - degraded.double()).square().mean().sqrt())
        return cache[(q, s)]

    coarse = [(q, s) for s in subsamplings for q in QUALITIES[2::5]]
    q0, s0 = min(coarse, key=lambda qs: misfit(*qs))
    fine = [(q, s) for s in subsamplings for q in range(max(1, q0 - 4), min(100, q0 + 4) + 1)]
    q, s = min(fine + [(q0, s0)], key=lambda qs: misfit(*qs))
    return JpegFit(q, s, misfit(q, s) / size)
