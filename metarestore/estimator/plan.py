"""From an estimate to what blind restoration does: the families to undo, in order, each at a strength, or
nothing.

Doing no harm comes first. A clean verdict, an unsure one (nothing at or above the threshold) or a family
the model cannot be told (it would guess, and a guess is what shifted the tones of clean photos) all mean
"leave the image as it is". Families that explain the same thing (``labels.ALTERNATIVES``: two kinds of
noise, kinds of softness, tone curves) are one finding: only the likeliest is undone, never several on top
of each other. A correction of the whole image's tones costs the most when it is wrong (an unseen
posterised photo read as under-exposed came back 20 dB worse), so low light needs a surer estimate
(``SURE``) unless its highlights are dark (``DARK_HIGHLIGHTS``); contrast is found only when the image's own
tones say they were flattened (``Estimator``, ``FLAT_SPAN``). And the milder a JPEG file's compression, the
less of the told correction is kept (``jpeg_strength``): at quality 95 the whole correction loses 0.7 to 0.8 dB,
a quarter of it gains 0.2 to 0.4 (docs/benchmarks.md, "Blind restoration").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from metarestore.estimator.estimate import Estimate

# the probability a global tone correction needs (the others need the estimate's threshold) ...
SURE = {"low_light": 0.8}
# ... unless the image's highlights say so: low light at the threshold where they stay at or under this
# (``evidence.highlights``). On 135 crops of 256 px of CBSD68, Kodak24, LIVE1 and Set14: 1 clean crop, 6
# posterised and 15 vignetted ones under it, none of them found low light at p >= 0.5; low light under noise and
# JPEG at severity 0.5 undone on 103 where p >= 0.8 alone undid 44
DARK_HIGHLIGHTS = 0.7
# from the third step of a chain on, each step needs this: the restorer never trained on chains, and every
# pass works on the previous one's output (a blur undone after the noise, found at p = 0.50 on a noisy
# JPEG that was not blurred, cost 0.6 dB)
SURE_FROM_THIRD = 0.6


@dataclass(frozen=True)
class Step:
    """Undo ``family`` (``None``: the model's blind pass, for a model that cannot be told), keeping
    ``strength`` of the correction: ``x + strength * (restored - x)``."""

    family: str | None
    strength: float = 1.0

    def keep(self, x, restored):
        """The step's output from its input ``x`` and the told model's ``restored``: all of the change, or
        ``strength`` of it."""
        return restored if self.strength >= 1.0 else (x + self.strength * (restored - x)).clamp(0, 1)

    def __str__(self) -> str:
        name = self.family or "blind"
        return name if self.strength >= 1.0 else f"{name}:{self.strength:.2f}"


def jpeg_strength(quality: float) -> float:
    """How much of the told JPEG correction to keep for a file saved at ``quality``: all of it up to 83,
    then less and less (half at 90, none from 97 on). Measured on LIVE1 and Kodak24 crops with Pillow's
    codec: the told row over-corrects mild compression (quality 90: +0.27 dB whole, +0.53 at half)."""
    return min(1.0, max(0.0, (97.0 - quality) / 14.0))


def plan(estimate: Estimate, told: Iterable[str]) -> list[Step]:
    """The steps, in the estimate's undo order (the last applied first); ``[]``: leave the image as it is.
    ``told``: the families the model can be told."""
    present = estimate.present  # one per group of alternatives already (``Estimate.present``)
    told = set(told)
    if any(family not in told for family in present):
        return []
    steps: list[Step] = []
    for family in present:
        if not sure(estimate, family):
            return []  # unsure of a global correction: nothing at all
        if len(steps) >= 2 and estimate.likelihood(family) < SURE_FROM_THIRD:
            break
        strength = 1.0
        if family == "jpeg":
            quality = estimate.jpeg_quality if estimate.jpeg_quality is not None else \
                90.0 - 80.0 * estimate.severities.get("jpeg", 0.0)  # the family's spec: 90 at 0, 10 at 1
            strength = jpeg_strength(quality)
        if strength > 0.0:
            steps.append(Step(family, round(strength, 2)))
    return joined(steps, told)


# the chains whose told row beats a told pass per family (configs/base-chains.yaml's A/B on LIVE1 and Kodak24
# crops made with Pillow and numpy: noise 15 + JPEG 75 +1.11 / +2.12 dB; a dark, noisy JPEG +3.4 dB; blur + noise
# + JPEG -0.34 / +0.12 and downsampling + JPEG -0.35 / -0.33 stay a pass per family; docs/benchmarks.md)
JOINED = ("gaussian_noise+jpeg", "low_light+gaussian_noise+jpeg")


def sure(estimate: Estimate, family: str) -> bool:
    """Whether ``estimate`` is sure enough of ``family`` to undo it (``SURE``, or dark highlights for low light)."""
    if estimate.likelihood(family) >= SURE.get(family, 0.0):
        return True
    dark = estimate.highlights is not None and estimate.highlights <= DARK_HIGHLIGHTS
    return family == "low_light" and dark and estimate.probabilities.get(family, 0.0) >= estimate.threshold


def joined(steps: list[Step], told: Iterable[str]) -> list[Step]:
    """``steps`` with every run of whole steps that a told chain of ``JOINED`` undoes at once (``a+b+c``,
    applied a, then b, then c: the steps c, b, a) replaced by that one step, the longest chain first: a model
    taught a row per chain (``configs/base-chains.yaml``) was trained on the chain itself, where a pass per
    family meets an input none of its rows was trained on."""
    chains = sorted((name.split("+")[::-1] for name in told if name in JOINED), key=len, reverse=True)
    out: list[Step] = []
    i = 0
    while i < len(steps):
        for members in chains:
            window = steps[i:i + len(members)]
            if [s.family for s in window] == members and all(s.strength >= 1.0 for s in window):
                out.append(Step("+".join(members[::-1])))
                i += len(members)
                break
        else:
            out.append(steps[i])
            i += 1
    return out
