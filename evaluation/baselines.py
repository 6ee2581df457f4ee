"""Classical restoration baselines, keyed by the degradation family they answer.

Each baseline is a small function ``(degraded HxWx3 float64, task params) -> restored HxWx3`` built on a
maintained library (``bm3d``, scikit-image), so "the model beats BM3D" means the BM3D people use.
Baselines that need the degradation's parameters get them from the task, as published non-blind
results do: BM3D is told the noise level, Wiener and Richardson-Lucy the blur kernel, biharmonic
inpainting the mask. They are oracles in that sense, which makes them strong references.

For ``downsample`` the degraded input already *is* the bicubic up-sampled image, so the ``identity``
rows are the bicubic baseline; ``unsharp`` is the classical step beyond it.

``bm3d`` is not a core dependency: its licence allows non-commercial use only, so it comes with the
optional extra ``metarestore[baselines]``. Without it, ``all`` means every installed baseline and asking
for ``bm3d`` by name is a one-line error naming the extra (docs/licences.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np
import torch

from metarestore.errors import UserError
from metarestore.registry import Registry

Baseline = Callable[[np.ndarray, dict], np.ndarray]

class UnknownBaselineError(UserError, KeyError):
    """A --baselines name no family registers."""


REGISTRY: Registry[Registry[Baseline]] = Registry("family with baselines")  # family -> its baselines by name


class MissingExtraError(UserError, ImportError):
    """A baseline whose library is in an optional extra that is not installed."""


# baseline name -> (module it imports, the extra that installs it, its licence in a few words)
OPTIONAL = {"bm3d": ("bm3d", "baselines", "free for non-commercial use only")}


def missing(name: str) -> str | None:
    """Why baseline ``name`` cannot run here (its optional library is not installed), or None."""
    if name not in OPTIONAL:
        return None
    module, extra, licence = OPTIONAL[name]
    try:
        importlib.import_module(module)
    except ImportError:
        return (f"baseline {name!r} needs the optional extra: pip install 'metarestore[{extra}]' "
                f"({module}'s licence: {licence})")
    return None


def register(family: str, name: str) -> Callable[[Baseline], Baseline]:
    def decorate(fn: Baseline) -> Baseline:
        if family not in REGISTRY:
            REGISTRY.add(family, Registry(f"baseline of {family}", error=UnknownBaselineError))
        return REGISTRY[family].add(name, fn)
    return decorate


def names() -> list[str]:
    return sorted({name for table in REGISTRY.values() for name in table})


def for_family(family: str, wanted: list[str] | None = None) -> list[str]:
    """Baseline names that apply to ``family`` (a chain gets none), filtered by ``wanted`` (None: all)."""
    table = REGISTRY.get(family, {})
    return [name for name in table if wanted is None or name in wanted]


def parse(spec: str) -> list[str] | None:
    """``all`` -> None (every applicable baseline; every installed one when an optional library is
    missing), ``none`` -> [], else a checked comma list."""
    spec = spec.strip()
    if spec == "all":
        installed = [name for name in names() if missing(name) is None]
        return None if installed == names() else installed
    if spec in ("none", ""):
        return []
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in names()]
    if unknown:
        raise UnknownBaselineError(f"unknown baseline {unknown[0]!r}; known: {', '.join(names())}, all, none")
    for name in wanted:
        if reason := missing(name):
            raise MissingExtraError(reason)
    return wanted


def run(name: str, family: str, degraded: torch.Tensor, params: dict) -> torch.Tensor:
    """Apply baseline ``name`` of ``family`` to a (1, 3, H, W) tensor; returns (1, 3, H, W) in [0, 1]."""
    image = degraded[0].detach().cpu().permute(1, 2, 0).double().numpy()
    out = REGISTRY[family][name](image, params)
    out = torch.from_numpy(np.ascontiguousarray(out)).float().permute(2, 0, 1)[None]
    return out.clamp(0, 1).to(degraded.device)


def _per_channel(fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray) -> np.ndarray:
    return np.stack([fn(image[..., c]) for c in range(image.shape[-1])], axis=-1)


# noise ---------------------------------------------------------------------------------------------
@register("gaussian_noise", "bm3d")
@register("awgn", "bm3d")
def bm3d_awgn(image: np.ndarray, params: dict) -> np.ndarray:
    """CBM3D (opponent colour space) told the true noise level, as in the published CBM3D tables."""
    import bm3d

    return bm3d.bm3d_rgb(image, sigma_psd=float(params["sigma"]))


@register("poisson_noise", "bm3d")
def bm3d_poisson(image: np.ndarray, params: dict) -> np.ndarray:
    """CBM3D after the Anscombe transform (noise std 1), then the asymptotically unbiased inverse."""
    import bm3d

    peak = float(params["peak"])
    stabilised = 2.0 * np.sqrt(np.maximum(image * peak, 0.0) + 3.0 / 8.0)
    denoised = bm3d.bm3d_rgb(stabilised, sigma_psd=1.0)
    return np.maximum((denoised / 2.0) ** 2 - 1.0 / 8.0, 0.0) / peak


@register("salt_pepper", "median")
def median(image: np.ndarray, params: dict) -> np.ndarray:
    """3x3 median filter per channel (5x5 above 10 % corrupted pixels), scikit-image."""
    from skimage.filters import median as sk_median

    size = 3 if float(params["amount"]) <= 0.1 else 5
    return _per_channel(lambda channel: sk_median(channel, np.ones((size, size)), mode="reflect"), image)


# blur ----------------------------------------------------------------------------------------------
def _kernel(family: str, params: dict) -> np.ndarray:
    from metarestore.degradations.blur import gaussian_kernel, motion_kernel

    if family == "gaussian_blur":
        return gaussian_kernel(float(params["sigma_x"]), float(params["sigma_y"]), float(params["angle"])).numpy()
    return motion_kernel(float(params["length"]), float(params["angle"])).numpy()


def _deconvolve(image: np.ndarray, psf: np.ndarray, method: str, balance: float = 0.0) -> np.ndarray:
    """An HxWxC image deconvolved per channel by ``operators.classical`` (the adapter's wiener and rl)."""
    from metarestore.operators.classical import deconvolve_per_channel

    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    return deconvolve_per_channel(x, psf, method, balance)[0].numpy().transpose(1, 2, 0)


def wiener(family: str) -> Baseline:
    def baseline(image: np.ndarray, params: dict) -> np.ndarray:
        """Wiener deconvolution (scikit-image, Laplacian regulariser) with the true kernel; a long motion
        kernel has more spectral zeros, so its regularisation grows with the length."""
        balance = 0.005 if family == "gaussian_blur" else 0.01 * float(params["length"])
        return _deconvolve(image, _kernel(family, params), "wiener", balance)
    return baseline


def richardson_lucy(family: str) -> Baseline:
    def baseline(image: np.ndarray, params: dict) -> np.ndarray:
        """Richardson-Lucy deconvolution (scikit-image, 30 iterations) with the true kernel."""
        return _deconvolve(image, _kernel(family, params), "rl")
    return baseline


for _family in ("gaussian_blur", "motion_blur"):
    register(_family, "wiener")(wiener(_family))
    register(_family, "richardson_lucy")(richardson_lucy(_family))


# compression and resolution ------------------------------------------------------------------------
@register("jpeg", "tv")
def tv_deblock(image: np.ndarray, params: dict) -> np.ndarray:
    """Total-variation smoothing (Chambolle), stronger for lower JPEG quality (weight 0.021 at quality 10,
    0.012 at 40, 0.004 at 70: tuned on LIVE1 crops, +0.3 to 0.5 dB RGB PSNR)."""
    from skimage.restoration import denoise_tv_chambolle

    weight = 0.025 * (1.0 - float(params["quality"]) / 100.0) ** 1.5
    return denoise_tv_chambolle(image, weight=weight, channel_axis=-1)


@register("downsample", "unsharp")
def unsharp(image: np.ndarray, params: dict) -> np.ndarray:
    """Unsharp masking of the bicubic image: x + 0.5 (x - G_s x), Gaussian std s = scale / 2.

    Written out with ``skimage.filters.gaussian`` because ``skimage.filters.unsharp_mask`` 0.26 returns
    overflowing values for float colour input with ``channel_axis``."""
    from skimage.filters import gaussian

    blurred = gaussian(image, sigma=0.5 * float(params["scale"]), channel_axis=-1, preserve_range=True)
    return image + 0.5 * (image - blurred)


# photometric ---------------------------------------------------------------------------------------
def _luminance(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114])


@register("low_light", "gamma")
def gamma(image: np.ndarray, params: dict) -> np.ndarray:
    """Blind exposure and gamma correction: the 99.5th percentile stretched to white, then the gamma that
    maps the mean luminance to 0.45 (a typical photograph's)."""
    exposed = np.clip(image / max(float(np.percentile(image, 99.5)), 1e-4), 0, 1)
    mean = float(np.clip(_luminance(exposed).mean(), 1e-4, 0.999))
    return exposed ** (np.log(0.45) / np.log(mean))


@register("low_light", "clahe")
def clahe(image: np.ndarray, params: dict) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (scikit-image)."""
    from skimage.exposure import equalize_adapthist

    return equalize_adapthist(np.clip(image, 0, 1), clip_limit=0.02)


@register("color_cast", "gray_world")
def gray_world(image: np.ndarray, params: dict) -> np.ndarray:
    """Grey-world white balance: every channel scaled to the same mean."""
    means = image.reshape(-1, image.shape[-1]).mean(axis=0)
    return image * (means.mean() / np.maximum(means, 1e-6))


@register("contrast", "stretch")
def stretch(image: np.ndarray, params: dict) -> np.ndarray:
    """Auto-contrast: the 1st..99th percentile stretched to [0, 1] (scikit-image)."""
    from skimage.exposure import rescale_intensity

    low, high = np.percentile(image, (1, 99))
    return rescale_intensity(image, in_range=(float(low), float(max(high, low + 1e-6))), out_range=(0.0, 1.0))


@register("haze", "dark_channel")
def dark_channel(image: np.ndarray, params: dict, patch: int = 15, omega: float = 0.95) -> np.ndarray:
    """Dark channel prior dehazing (He, Sun and Tang, CVPR 2009), blind: its own airlight guess, the
    transmission smoothed over the window instead of soft matting (``metarestore.operators.dehaze``)."""
    import torch

    from metarestore.operators import dehaze

    x = torch.from_numpy(np.clip(image, 0, 1)).permute(2, 0, 1)[None]
    return dehaze(x, omega=omega, patch=patch)[0].permute(1, 2, 0).numpy()


@register("inpainting", "biharmonic")
def biharmonic(image: np.ndarray, params: dict) -> np.ndarray:
    """Biharmonic inpainting (scikit-image) of the known mask."""
    from skimage.restoration import inpaint_biharmonic

    from metarestore.degradations.masking import inpainting_masks

    mask = inpainting_masks(1, image.shape[0], image.shape[1], params)[0, 0].numpy()
    return inpaint_biharmonic(image, mask, channel_axis=-1)
