"""Restoration paths: how an adapter turns a degraded image into a restored one, given operators fitted
on support pairs and the restorer (a ``MetaLearner``) as the image prior.

A path is a pre-step that undoes a fitted operator (``operators.base.Operator``: each registered operator
names its own pre-steps, e.g. the kernel's ``deconv``, ``hqs``, ``wiener`` and ``rl``, and restores them;
``operators.catalog`` lists them), or none; then the restorer itself with its
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

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from metarestore.degradations import image_families, names, not_an_image_family
from metarestore.model.kinds import KINDS
from metarestore.operators.base import OPERATORS, Operator
from metarestore.operators.catalog import CLASSICAL, PRE_STEPS, operator_of

OPERATOR_OF = {pre: operator_of(pre).name for pre in PRE_STEPS if pre != "none"}  # pre-step -> operator name
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
    def operator(self) -> type[Operator] | None:
        """The operator class whose fit this path's pre-step undoes (None: no pre-step)."""
        return operator_of(self.pre)

    @classmethod
    def parse(cls, name: str) -> Path:
        restorer = "net"
        if name == "zero_shot":
            return cls()
        if name == "identity":
            return IDENTITY
        if name.startswith("told:") and len(name) > 5:
            parts = name[5:].split("+")  # a family, or a chain of them (a+b), then an adapter kind or none
            kind = parts.pop() if len(parts) > 1 and parts[-1] in KINDS else ""
            if not kind and len(parts) > 1 and parts[-1].partition("*")[0] not in names():
                raise ValueError(f"unknown adapter kind {parts[-1]!r} in an adaptation path "
                                 f"(known: {', '.join(KINDS)})")
            family = "+".join(parts)
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
        if pre in CLASSICAL:
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
    if learner is not None:  # single families: a chain's row (a+b) is there to be asked for
        paths += [Path(told=f) for f in image_families(learner.hint_families) if "+" not in f]
    return paths


@dataclass
class Operators:
    """The operators fitted on one set of support pairs, by name (each only when some path needs it):
    ``ops.kernel``, ``ops.tone``, ... is the fit of that name, or None."""

    fits: dict[str, Operator] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Operator | None:
        if name in OPERATORS:
            return self.__dict__.get("fits", {}).get(name)
        raise AttributeError(name)

    @property
    def residuals(self) -> dict[str, float]:
        return {name: fit.residual for name, fit in self.fits.items()}

    @classmethod
    def fit(cls, clean: torch.Tensor, degraded: torch.Tensor, needed: Iterable[type[Operator]]) -> Operators:
        """Every operator in ``needed`` that models images of ``clean``'s channel count, fitted on the pairs."""
        needed = set(needed)
        return cls({op.name: op.fit(clean, degraded) for op in OPERATORS.values()
                    if op in needed and op.channels in (None, clean.shape[1])})

    def prepare(self, path: Path, learner) -> None:
        """Do now what ``path`` would otherwise do on first use (a synthetic path's training)."""
        if path.operator is not None and path.operator.name in self.fits:
            self.fits[path.operator.name].prepare(learner)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: v for fit in self.fits.values() for n, v in fit.tensors().items()}

    def headers(self) -> dict[str, dict]:
        return {name: header for name, fit in self.fits.items() if (header := fit.header())}


def pre_step(path: Path, ops: Operators, x: torch.Tensor, learner=None) -> torch.Tensor:
    """Undo the fitted operator of ``path`` on (B, C, H, W) ``x``; the result is clamped to [0, 1]."""
    if path.operator is None:
        return x
    fit = ops.fits.get(path.operator.name)
    if fit is None:
        raise ValueError(f"path {path.name} needs a fitted {path.operator.name} operator")
    return fit.restore(x, path, learner).clamp(0, 1).to(x.dtype)
