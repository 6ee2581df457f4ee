"""Restoration paths: how an adapter turns a degraded image into a restored one, given operators fitted
on support pairs and the restorer (a ``MetaLearner``) as the image prior.

A path is a pre-step that undoes the fitted operator (deconvolution, tone inversion, dehazing, or none),
or, for an operator that can be re-applied (a JPEG codec setting, a noise model: ``jpeg``, ``noise``), the
restorer retrained on pairs that operator synthesises from the clean support (``synthetic``),
optionally half-quadratic splitting with the restorer as the denoiser, then the restorer itself with its
own weights, its state of an adapter kind (``metarestore.model.kinds``: ``film``, ``lora``, ...) adapted
by gradient steps on (pre-stepped support, clean) pairs, or no restorer at all (the classical baselines).
A model that can be told the degradation (``model.condition: family``) adds one path per family it knows,
``told:FAMILY``: the restorer as is, told that family ("these pairs look like JPEG"), and ``told:FAMILY*N``:
the same restorer applied N times, for pairs more degraded than anything it was trained on (JPEG at
quality 8 against the training's 10 to 90: one pass under-corrects).
Every path is named by a short string, e.g. ``deconv@0.01+film``, ``lora``, ``told:jpeg`` or ``told:jpeg*2``;
``identity`` leaves the image as it is (the candidate that keeps an adapter from doing harm).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from metarestore.degradations import image_families, names, not_an_image_family
from metarestore.model.kinds import KINDS
from metarestore.operators.codec import JpegFit, fit_jpeg
from metarestore.operators.fourier import deconvolve
from metarestore.operators.haze import HazeFit, fit_haze
from metarestore.operators.kernel import KernelFit, fit_kernel
from metarestore.operators.synthetic import KIND as SYNTHETIC_KIND
from metarestore.operators.synthetic import PairNoiseFit, fit_pair_noise, train_on_synthetic
from metarestore.operators.tone import ToneFit, fit_tone

PRE_STEPS = ("none", "deconv", "hqs", "tone", "haze", "wiener", "rl", "jpeg", "noise")
OPERATOR_OF = {"deconv": "kernel", "hqs": "kernel", "wiener": "kernel", "rl": "kernel", "tone": "tone",
               "haze": "haze", "jpeg": "jpeg", "noise": "noise"}
SYNTHETIC = ("jpeg", "noise")  # pre-steps that restore with the network retrained on synthesised pairs
MAX_PASSES = 3  # told:F*N: at most this many passes of the restorer (each costs a forward pass)


@dataclass(frozen=True)
class Path:
    pre: str = "none"  # one of PRE_STEPS
    balance: float = 0.0  # Tikhonov weight of deconv/hqs/wiener
    restorer: str = "net"  # "net" (the model as is), an adapter kind (adapted, e.g. "film"), "none" (classical)
    told: str | None = None  # the family a model that can be told it restores as (pre none; net or adapted)
    passes: int = 1  # times the told restorer runs (told, net only: told:F*N)

    @property
    def adapted(self) -> bool:
        """Whether the restorer is gradient-adapted (``restorer`` names an adapter kind)."""
        return self.restorer not in ("net", "none")

    @property
    def name(self) -> str:
        if self.told is not None:
            return f"told:{self.told}" + (f"*{self.passes}" if self.passes > 1 else "") + (
                f"+{self.restorer}" if self.adapted else "")
        if self.pre == "none" and self.restorer == "none":
            return "identity"
        pre = "zero_shot" if self.pre == "none" and self.restorer == "net" else self.pre
        if self.pre == "none" and self.adapted:
            return self.restorer
        if self.balance:
            pre = f"{pre}@{self.balance:g}"
        return f"{pre}+{self.restorer}" if self.adapted else pre

    @property
    def operator(self) -> str | None:
        return OPERATOR_OF.get(self.pre)

    @classmethod
    def parse(cls, name: str) -> Path:
        restorer = "net"
        if name == "zero_shot":
            return cls()
        if name == "identity":
            return IDENTITY
        if name.startswith("told:") and len(name) > 5:
            family, _, kind = name[5:].partition("+")
            if kind and kind not in KINDS:
                raise ValueError(f"unknown adapter kind {kind!r} in an adaptation path (known: {', '.join(KINDS)})")
            family, star, passes = family.partition("*")
            if star and (kind or passes not in [str(n) for n in range(2, MAX_PASSES + 1)]):
                raise ValueError(f"told:{family}*N takes N from 2 to {MAX_PASSES}, without an adapter kind")
            if family in names() and (reason := not_an_image_family(family)):
                raise ValueError(reason)  # an adapter is fitted on, and answers, images
            return cls(restorer=kind or "net", told=family, passes=int(passes) if star else 1)
        if name in KINDS:
            return cls(restorer=name)
        if "+" in name:
            name, _, restorer = name.rpartition("+")
            if restorer not in KINDS:
                raise ValueError(f"unknown adapter kind {restorer!r} in an adaptation path "
                                 f"(known: {', '.join(KINDS)})")
        pre, _, balance = name.partition("@")
        if pre not in PRE_STEPS:
            raise ValueError(f"unknown adaptation path {name!r}")
        if pre in ("wiener", "rl", *SYNTHETIC):
            restorer = "none"
        return cls(pre, float(balance) if balance else 0.0, restorer)


IDENTITY = Path(restorer="none")  # "leave the image as it is": no pre-step, no restorer


def default_paths(learner=None) -> list[Path]:
    """The candidates an adapter chooses among by held-out validation (with ``learner``: plus ``told:F`` for
    every family F its model can be told). ``identity`` comes first: it scores exactly the input's PSNR,
    so an adapter never chooses a path that does worse than the input on the held-out pairs, and a tie
    keeps the image as it is."""
    paths = [IDENTITY, Path(), Path(restorer="film"), Path(restorer="lora")]
    for balance in (0.003, 0.03):
        paths.append(Path("deconv", balance))
    paths += [Path("deconv", 0.01, "film"), Path("hqs", 0.01), Path("tone"), Path("tone", restorer="film"),
              Path("haze"), Path("wiener", 0.01, "none"), Path("rl", 0.0, "none")]
    # ``jpeg`` and ``noise`` are there to be asked for (kind=jpeg), not validated by default: the codec's
    # grid search alone costs ~0.7 s of the 1 s an automatic adapter has (issue 16), and on Poisson-Gaussian
    # noise the base model retrained on synthesised pairs gained nothing (+0.0 dB, 5 pairs, 30 steps)
    if learner is not None:
        paths += [Path(told=f) for f in image_families(getattr(learner.model, "hint_families", ()))]
    return paths


@dataclass
class Operators:
    """The operators fitted on one set of support pairs (each only when some path needs it)."""

    kernel: KernelFit | None = None
    tone: ToneFit | None = None
    haze: HazeFit | None = None
    jpeg: JpegFit | None = None
    noise: PairNoiseFit | None = None
    residuals: dict[str, float] = field(default_factory=dict)
    clean: torch.Tensor | None = None  # the clean support, kept while a synthetic path may still train on it
    trained: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # synthetic pre-step -> network

    @classmethod
    def fit(cls, clean: torch.Tensor, degraded: torch.Tensor, needed: set[str]) -> Operators:
        ops = cls()
        fitters = {"kernel": fit_kernel, "tone": fit_tone, "haze": fit_haze, "jpeg": fit_jpeg, "noise": fit_pair_noise}
        for name, fit in fitters.items():
            if name in needed and (name != "haze" or clean.shape[1] == 3):  # the haze model is colour-only
                setattr(ops, name, fit(clean, degraded))
                ops.residuals[name] = getattr(ops, name).residual
        if needed & set(SYNTHETIC):
            ops.clean = clean
        return ops

    def prepare(self, path: Path, learner) -> None:
        """Do now what ``path`` would otherwise do on first use (a synthetic path's training)."""
        if path.pre in SYNTHETIC:
            self.retrained(path, learner)

    def retrained(self, path: Path, learner) -> dict[str, torch.Tensor]:
        """The network state of synthetic ``path``, trained on first use; ``ValueError`` when the pairs do
        not fit that operator (its fit is not ``good``): training would only learn a wrong degradation."""
        if path.pre in self.trained:
            return self.trained[path.pre]
        fit = getattr(self, path.operator)
        if fit is None or not fit.good:
            raise ValueError(f"the support pairs do not fit the {path.pre} model")
        if self.clean is None:
            raise ValueError(f"path {path.name} needs the clean support pairs")
        synthesise = fit.apply if path.pre == "noise" else (lambda y, _g: fit.apply(y))
        self.trained[path.pre] = train_on_synthetic(learner, self.clean, synthesise)
        return self.trained[path.pre]

    # storage (``Adapter.to_bytes``): the synthetic paths' fits in the header, their network as tensors
    def header(self) -> dict:
        return {name: getattr(self, name).as_dict() for name in SYNTHETIC if getattr(self, name) is not None}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"synthetic.{pre}.{n}": v.float().cpu().contiguous()
                for pre, state in self.trained.items() for n, v in state.items()}

    def read(self, header: dict, tensors: dict[str, torch.Tensor], learner) -> None:
        """The synthetic paths' fits and network back from ``header`` and ``tensors``; ``ValueError`` if bad."""
        from metarestore.model.kinds import get_kind

        try:
            if "jpeg" in header:
                j = header["jpeg"]
                self.jpeg = JpegFit(int(j["quality"]), int(j["subsampling"]), float(j["residual"]))
                if not (1 <= self.jpeg.quality <= 100 and self.jpeg.subsampling in (0, 1, 2)):
                    raise ValueError("bad JPEG setting")
            if "noise" in header:
                self.noise = PairNoiseFit(**{k: float(header["noise"][k])
                                             for k in ("gain", "floor", "correlation", "residual")})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad synthetic operator header: {exc}") from None
        own = next(learner.model.parameters())
        for pre in SYNTHETIC:
            prefix = f"synthetic.{pre}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                get_kind(SYNTHETIC_KIND).check(learner.model, state)
                self.trained[pre] = {n: v.to(own.device, own.dtype) for n, v in state.items()}


def _skimage_per_channel(x: torch.Tensor, kernel: torch.Tensor, method: str, balance: float) -> torch.Tensor:
    """scikit-image's Wiener or Richardson-Lucy on every channel of an edge-padded copy."""
    from skimage.restoration import richardson_lucy, wiener

    psf = kernel.double().cpu().numpy()
    if psf.ndim == 3:
        psf = psf.mean(0)
    pad = psf.shape[0]
    out = np.empty(tuple(x.shape), dtype=np.float64)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            image = np.pad(x[b, c].double().cpu().numpy(), pad, mode="edge")
            if method == "wiener":
                res = wiener(image, psf, balance=balance, clip=False)
            else:
                res = richardson_lucy(np.clip(image, 0, 1), psf, num_iter=30, clip=False)
            out[b, c] = res[pad:-pad, pad:-pad]
    return torch.from_numpy(out).to(x)


def pre_step(path: Path, ops: Operators, x: torch.Tensor, learner=None, hqs_iters: int = 4) -> torch.Tensor:
    """Undo the fitted operator on (B, C, H, W) ``x``; the result is clamped to [0, 1]."""
    if path.pre == "none":
        return x
    if path.pre in ("deconv", "hqs", "wiener", "rl") and ops.kernel is None:
        raise ValueError(f"path {path.name} needs a fitted kernel")
    if path.pre == "deconv":
        out = deconvolve(x, ops.kernel.kernel, path.balance)
    elif path.pre == "hqs":
        out = hqs(x, ops.kernel.kernel, learner, path.balance, hqs_iters)
    elif path.pre in ("wiener", "rl"):
        out = _skimage_per_channel(x, ops.kernel.kernel, path.pre, path.balance)
    elif path.pre == "tone":
        out = ops.tone.invert(x)
    elif path.pre in SYNTHETIC:
        out = learner.restore(x, ops.retrained(path, learner), kind=SYNTHETIC_KIND)
    elif path.pre == "haze":
        if ops.haze is None:
            raise ValueError("the haze model needs 3-channel images")
        out = ops.haze.restore(x)
    else:
        raise ValueError(f"unknown pre-step {path.pre!r}")
    return out.clamp(0, 1).to(x.dtype)


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
