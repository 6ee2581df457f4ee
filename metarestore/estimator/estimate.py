"""From an image (and, when there is one, its file) to an ``Estimate``: which families are present, how
strongly, or nothing at all.

The network reads up to ``crops`` windows of ``crop`` px spread over the image, at offsets that are
multiples of 8 (a JPEG file's blocks stay where the network learned them), and its probabilities are
averaged over the windows. A JPEG file's quantization tables outrank the pixels: the file says it is JPEG
and at which quality. So do the image's tones for ``contrast``: a flattened image's values stay near its mean
(``evidence.tone_span``), which the look of a few windows cannot tell from a misty scene; and its detail's
periodicity for softness: an enlarged picture's (``downsample``) is periodic, a blurred one's is not
(``evidence.resampling_peak``), where the windows' look reads most blurs as lost resolution.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metarestore import degradations
from metarestore.checkpoint import load_checkpoint
from metarestore.degradations.base import ParamSpec
from metarestore.estimator.evidence import highlights, jpeg_quality, noise_sigma, resampling_peak, tone_span
from metarestore.estimator.labels import ALTERNATIVES, UNDO_ORDER
from metarestore.estimator.network import EstimatorNet
from metarestore.pixels import center_crop

BUILTIN = Path(__file__).resolve().parent / "weights"  # the estimator that ships (not a restorer: not builtin:)
# a family counts as present from this probability on; below it the image is left as it is
THRESHOLD = 0.5
MIN_SIDE = 16  # smaller images are too small to judge: they are found clean (left as they are)
# an image whose tones reach at most this far from its mean (``tone_span``) has been flattened, and its
# contrast is restored: by the ``contrast`` family (factor <= this: its severity >= 0.35) or, more rarely, by
# haze (6% of hazed CBSD68 / Kodak24 / LIVE1 crops at severity 0.5 and 0.75), where the told stretch moves
# the image by -1.0 to +0.3 dB, against +18.6 dB on average on flattened contrast (docs/benchmarks.md, "Blind
# restoration"); the network's own contrast-or-haze call misses 30% of those. An image whose tones reach
# further was not flattened that much, and is never stretched (a clean photo reaches at least 0.77)
FLAT_SPAN = 0.72
# softness read as downsampling with a resampling peak (``resampling_peak``) under this is a blur, as long as
# the network gives blur at least ``BLUR_FLOOR`` (``soft``). Chosen on Set5 and Set14 crops (blur and downsampling
# at severities 0.25 / 0.5 / 0.75, told either way): no downsampled crop told blur (a told blur on a resampled
# image costs up to 2.8 dB, below its input), blur told as blur on 86 to 92% of them (docs/benchmarks.md,
# "Blind restoration")
RESAMPLED_PEAK, BLUR_FLOOR = 3.0, 0.1


def severity_of_quality(quality: int) -> float:
    """The ``jpeg`` family's severity for a quality factor (its spec: quality 90 at 0, 10 at 1)."""
    return _spec("jpeg", "quality").severity_of(quality)


def _spec(family: str, parameter: str) -> ParamSpec:
    """A family's parameter as the registry defines it over severity."""
    return degradations.get(family).specs[parameter]


@dataclass
class Estimate:
    """What happened to an image: per label the probability it is present and its strength (0..1)."""

    probabilities: dict[str, float]
    severities: dict[str, float]
    jpeg_quality: int | None = None  # from the file's quantization tables
    tone_span: float | None = None  # how far the tones reach from their mean (``evidence.tone_span``)
    resampling_peak: float | None = None  # how periodic the fine detail is (``evidence.resampling_peak``)
    highlights: float | None = None  # how bright the brightest pixels are (``evidence.highlights``)
    noise_sigma: float | None = None  # measured, 8-bit levels, when asked for
    threshold: float = THRESHOLD
    extra: dict[str, Any] = field(default_factory=dict)

    def likelihood(self, family: str) -> float:
        """How likely ``family``'s look is present: with its alternatives (``ALTERNATIVES``) together, as
        the chance that at least one of them is (their probabilities split on an image that shows one)."""
        group = next((g for g in ALTERNATIVES if family in g), (family,))
        absent = 1.0
        for f in group:
            absent *= 1.0 - self.probabilities.get(f, 0.0)
        return 1.0 - absent

    @property
    def present(self) -> list[str]:
        """The families found, in the order they are undone (the last applied first): those whose look is
        likely at or above the threshold (``likelihood``), each group of alternatives as its likeliest
        member."""
        found = []
        for f, p in self.probabilities.items():
            group = next((g for g in ALTERNATIVES if f in g), (f,))
            if self.likelihood(f) >= self.threshold and p == max(self.probabilities.get(g, 0.0) for g in group):
                found.append(f)
        return sorted(found, key=lambda f: UNDO_ORDER.index(f) if f in UNDO_ORDER else len(UNDO_ORDER))

    @property
    def clean(self) -> bool:
        return not self.present

    def summary(self) -> str:
        """One line for a console or a response header: ``clean (p=0.97)`` or
        ``jpeg (p=1.00, quality 30) + gaussian_noise (p=0.91, severity 0.40)``."""
        if self.clean:
            return f"clean (p={1 - max(self.likelihood(f) for f in self.probabilities):.2f})"
        parts = []
        for f in self.present:
            detail = (f"quality {self.jpeg_quality}" if f == "jpeg" and self.jpeg_quality is not None
                      else f"severity {self.severities[f]:.2f}")
            parts.append(f"{f} (p={self.likelihood(f):.2f}, {detail})")
        return " + ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"present": self.present, "clean": self.clean, "summary": self.summary(),
                "probabilities": {k: round(v, 4) for k, v in self.probabilities.items()},
                "severities": {k: round(v, 4) for k, v in self.severities.items()},
                "jpeg_quality": self.jpeg_quality,
                "tone_span": None if self.tone_span is None else round(self.tone_span, 4),
                "resampling_peak": None if self.resampling_peak is None else round(self.resampling_peak, 2),
                "highlights": None if self.highlights is None else round(self.highlights, 3),
                "noise_sigma": None if self.noise_sigma is None else round(self.noise_sigma, 2)}


def crop_origins(size: int, crop: int, count: int) -> list[int]:
    """Up to ``count`` window starts along a side, evenly spread, each a multiple of 8."""
    if size <= crop:
        return [0]
    last = (size - crop) // 8 * 8
    if count <= 1:
        return [last // 16 * 8]
    return sorted({round(last * i / (count - 1) / 8) * 8 for i in range(count)})


class Estimator:
    """A trained ``EstimatorNet`` with how it reads an image: ``estimator(image, data)`` -> Estimate."""

    def __init__(self, net: EstimatorNet, threshold: float = THRESHOLD, crop: int = 96, grid: int = 3,
                 metadata: dict[str, Any] | None = None):
        self.net = net.eval()
        self.threshold, self.crop, self.grid = threshold, crop, grid
        self.metadata = metadata or {}

    @property
    def labels(self) -> tuple[str, ...]:
        return self.net.labels

    def windows(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) -> (n, 3, c, c) windows over the image (one, the whole image, when it is small)."""
        h, w = image.shape[-2:]
        c = self.crop
        if min(h, w) < c:
            return image[None]
        return torch.stack([image[:, t:t + c, s:s + c] for t in crop_origins(h, c, self.grid)
                            for s in crop_origins(w, c, self.grid)])

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, H, W) float in [0, 1] -> (probabilities (L,), severities (L,)) averaged over the windows;
        a severity is weighted by how sure each window is that its family is there."""
        device = next(self.net.parameters()).device
        logits, sev = self.net(self.windows(image.to(device, torch.float32)))
        p = torch.sigmoid(logits)
        severity = (p * sev).sum(0) / p.sum(0).clamp_min(1e-6)
        return p.mean(0).cpu(), severity.cpu()

    def __call__(self, image: torch.Tensor, data: bytes | None = None, noise: bool = False) -> Estimate:
        """``image``: (3, H, W) or (1, 3, H, W), float in [0, 1]; ``data``: the file it was read from, if
        any (its JPEG tables are evidence); ``noise``: also measure the noise level (a report's figure, which
        no decision uses: restoring does not pay for it)."""
        if image.ndim == 4:
            image = image[0]
        judged = min(image.shape[-2:]) >= MIN_SIDE  # too few pixels to judge: nothing is found, nothing undone
        if judged:
            p, sev = (t.nan_to_num(0.0) for t in self.probabilities(image))
        else:
            p = sev = torch.zeros(len(self.labels))
        probabilities = dict(zip(self.labels, p.tolist(), strict=True))
        severities = dict(zip(self.labels, sev.tolist(), strict=True))
        quality = jpeg_quality(data)
        if quality is not None and "jpeg" in probabilities:
            probabilities["jpeg"], severities["jpeg"] = 1.0, severity_of_quality(quality)
        span = peak = bright = sigma = None
        if judged:
            # the central 512 px at most for what a whole 6 MP photo would make slow (a wavelet transform: 0.3 s)
            centre = center_crop(image, 512, 512)
            span, peak, bright = tone_span(image), resampling_peak(centre), highlights(image)
            if "contrast" in probabilities:
                flattened = span <= FLAT_SPAN and _tone_is_the_story(probabilities, self.threshold)
                probabilities["contrast"] = 1.0 if flattened else 0.0
                if flattened:  # the family's factor leaves a span at most the factor
                    severities["contrast"] = _spec("contrast", "factor").severity_of(span)
            if {"gaussian_blur", "downsample"} <= probabilities.keys():
                soft(probabilities, peak)
            sigma = noise_sigma(centre) if noise else None
        return Estimate(probabilities, severities, quality, span, peak, bright, sigma, self.threshold)


def _tone_is_the_story(probabilities: dict[str, float], threshold: float) -> bool:
    """Whether flattened tones are the image's story: no family found but tone curves (and a JPEG file's
    codec, which leaves the extremes be). A blur also pulls the extremes in: a blurred crop can fall under
    ``FLAT_SPAN`` (4 of 360 on CBSD68, Kodak24 and LIVE1, a blur found on each), and stretching it cost 1.8 dB."""
    tones = next(g for g in ALTERNATIVES if "contrast" in g)
    found = Estimate(probabilities, {}, threshold=threshold).present
    return all(f in tones or f == "jpeg" for f in found)


def soft(probabilities: dict[str, float], peak: float) -> None:
    """Blur, not lost resolution, where the detail is not periodic: the network never read a downsampled
    crop as blur (0 of 108 on Set5 and Set14), but reads most blurred 8-bit images as downsampled. Where it
    says downsampling, the detail is not periodic (``peak`` < ``RESAMPLED_PEAK``) and blur is not unlikely
    (``BLUR_FLOOR``), the two probabilities are swapped: the group's likelihood, hence whether softness is
    found at all, stays the network's."""
    blur, down = probabilities["gaussian_blur"], probabilities["downsample"]
    if down > blur >= BLUR_FLOOR and peak < RESAMPLED_PEAK:
        probabilities["gaussian_blur"], probabilities["downsample"] = down, blur


def load_estimator(path: str | Path | None = None, device: str | torch.device = "cpu") -> Estimator:
    """An estimator from a checkpoint directory (default: the one that ships, ``weights/estimator``);
    safetensors and JSON, nothing unpickled."""
    ckpt = load_checkpoint(path or BUILTIN, device=str(device))
    meta = ckpt.metadata
    net = EstimatorNet(meta["labels"], tuple(meta.get("widths", (16, 32, 48, 64, 96))),
                       meta.get("spectral_bins", 0))
    net.load_state_dict(ckpt.model)
    return Estimator(net.to(device), meta.get("threshold", THRESHOLD), meta.get("crop", 96),
                     meta.get("grid", 3),
                     meta)


@functools.lru_cache(maxsize=1)
def default_estimator() -> Estimator:
    """The shipped estimator, loaded once per process (on the CPU: it reads a few small windows)."""
    return load_estimator()
