"""Blind restoration as a new user meets it (issue 39): photos degraded outside the degradation registry
(Pillow's JPEG codec at 4:2:0, numpy noise, Pillow's filters), the registry's trained families saved as
8-bit PNG (the CLI's ``degrade``), and degradations of our own that no training ever saw; each restored
the way ``metarestore restore`` does with no degradation named (``inference.restore_estimated``), with the
model's raw blind row and with the true families told, for comparison.

A case is (name, degraded 8-bit image, the file's bytes as a user would send them, the families a told
restorer would undo, in order).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from metarestore import degradations
from metarestore.degradations.base import cpu_generator, stable_seed
from metarestore.inference import restore_estimated, restore_image
from metarestore.meta.losses import psnr
from metarestore.registry import Registry

TRAINED_SEVERITIES = (0.25, 0.5, 0.75)


@dataclass
class Case:
    name: str
    group: str  # clean, codec, combined, trained, unseen
    degraded: np.ndarray  # H x W x 3 uint8
    data: bytes  # the file a user would send
    told: list[str]  # what a told restorer undoes, in order ([]: nothing)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(a: np.ndarray, quality: int) -> tuple[np.ndarray, bytes]:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)  # Pillow's default 4:2:0 subsampling
    data = buf.getvalue()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), data


def _noise(a: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(a + rng.normal(0, sigma, a.shape), 0, 255).round().astype(np.uint8)


def _pil(a: np.ndarray, f: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.asarray(f(Image.fromarray(a)).convert("RGB"))


def _pixelate(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    return _pil(a, lambda im: im.resize((w // 4, h // 4), Image.NEAREST).resize((w, h), Image.NEAREST))


def _vignette(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    gain = 1 - 0.45 * (xx**2 + yy**2) / 2
    return np.clip(a * gain[..., None], 0, 255).round().astype(np.uint8)


def _speckle(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(a * (1 + rng.normal(0, 0.12, a.shape)), 0, 255).round().astype(np.uint8)


# degradations no family of the registry makes and no training sees
UNSEEN: Registry[Callable[[np.ndarray, np.random.Generator], np.ndarray]] = Registry("unseen degradation", {
    "pixelate x4 (nearest)": lambda a, rng: _pixelate(a),
    "vignette": lambda a, rng: _vignette(a),
    "oversharpen (unsharp 200%)": lambda a, rng: _pil(a, lambda im: im.filter(ImageFilter.UnsharpMask(2, 200, 0))),
    "posterize 4 bits": lambda a, rng: _pil(a, lambda im: ImageOps.posterize(im, 4)),
    "speckle 12%": _speckle,
})


def cases(clean: np.ndarray, index: int, told: list[str], trained: bool = True) -> Iterator[Case]:
    """Every case for one clean H x W x 3 uint8 image (``index`` seeds its noise); ``told``: the families
    the model can be told (the trained families' cases need them)."""
    rng = np.random.default_rng(index)
    yield Case("clean photo", "clean", clean, _png(clean), [])
    for q in (10, 30, 60, 90, 95):
        a, data = _jpeg(clean, q)
        yield Case(f"JPEG q{q} (Pillow)", "codec", a, data, ["jpeg"])
    a, data = _jpeg(_noise(clean, 15, rng), 75)
    yield Case("noise 15 then JPEG q75", "combined", a, data, ["jpeg", "gaussian_noise"])
    a = _pil(clean, lambda im: im.filter(ImageFilter.GaussianBlur(1.2)))
    yield Case("Gaussian blur 1.2 (Pillow)", "codec", a, _png(a), ["gaussian_blur"])
    a = _noise(clean, 25, rng)
    yield Case("AWGN 25, 8-bit (numpy)", "codec", a, _png(a), ["gaussian_noise"])
    for name, op in UNSEEN.items():
        a = op(clean, rng)
        yield Case(name, "unseen", a, _png(a), [])
    if not trained:
        return
    x = torch.from_numpy(clean.copy()).permute(2, 0, 1)[None].float() / 255
    for family in told:
        for severity in TRAINED_SEVERITIES:
            f = degradations.get(family)
            params = f.sample(severity, cpu_generator(stable_seed(family, severity, index)))
            a = (f(x, params)[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            yield Case(f"{family} {severity}", "trained", a, _png(a), [family])


def center_crop(a: np.ndarray, size: int) -> np.ndarray:
    h, w = a.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return a[top:top + size, left:left + size]


def tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 255


def evaluate_case(learner, estimator, case: Case, clean: torch.Tensor, tile: int = 256) -> dict:
    """PSNR of the input, the default (estimated) path, the raw blind row and told, plus what was found."""
    x = tensor(case.degraded)
    estimate = estimator(x, case.data)
    y, steps = restore_estimated(learner, x, estimate, tile=tile)
    out = {"case": case.name, "group": case.group, "input": psnr(x, clean), "default": psnr(y, clean),
           "found": ",".join(map(str, steps)) or "-", "summary": estimate.summary()}
    out["blind_row"] = psnr(restore_image(learner, x, tile=tile), clean)
    if case.told:
        t = x
        for family in case.told:
            t = restore_image(learner, t, tile=tile, family=family)
        out["told"] = psnr(t, clean)
    return out
