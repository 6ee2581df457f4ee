"""The registered degradation families, in registry order.

Each family lives in a small module by kind (noise, blur, compression, photometric, masking); this module
only registers them. Every operator takes a (B,C,H,W) float batch in [0, 1] with C = 1 or 3 and draws any
randomness on the CPU from ``params["seed"]``, so CPU and CUDA give the same result for the same params.
"""

from __future__ import annotations

from metarestore.degradations.blur import GaussianBlur, MotionBlur
from metarestore.degradations.compression import Downsample, Jpeg
from metarestore.degradations.masking import Inpainting
from metarestore.degradations.noise import Awgn, GaussianNoise, PoissonNoise, SaltPepper
from metarestore.degradations.photometric import ColorCast, Contrast, Haze, LowLight
from metarestore.degradations.registry import register

FAMILIES = (GaussianNoise(), PoissonNoise(), SaltPepper(), GaussianBlur(), MotionBlur(), Jpeg(),
            Downsample(), LowLight(), ColorCast(), Contrast(), Haze(), Inpainting(), Awgn())

for _family in FAMILIES:
    register(_family)

__all__ = ["FAMILIES", "Awgn", "ColorCast", "Contrast", "Downsample", "GaussianBlur", "GaussianNoise", "Haze",
           "Inpainting", "Jpeg", "LowLight", "MotionBlur", "PoissonNoise", "SaltPepper"]
