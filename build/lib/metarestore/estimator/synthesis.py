"""The estimator's training examples: clean crops (nothing to undo), one family, or a chain of families as
photos go through them, each with what is present and how strongly."""

from __future__ import annotations

import torch

from metarestore import degradations
from metarestore.estimator.labels import LABELS, REALISTIC_CHAINS

# of the examples: a quarter clean, 45% one family, 30% a chain (two thirds of those a realistic chain,
# the rest any two families)
P_CLEAN, P_SINGLE = 0.25, 0.45


def draw_recipe(generator: torch.Generator, labels: tuple[str, ...] = LABELS) -> list[tuple[str, float]]:
    """A list of (family, severity) applied in order; empty for a clean example."""
    u = float(torch.rand((), generator=generator))

    def severity() -> float:
        return float(torch.rand((), generator=generator))

    def pick(options) -> object:
        return options[int(torch.randint(0, len(options), (), generator=generator))]

    if u < P_CLEAN:
        return []
    if u < P_CLEAN + P_SINGLE:
        return [(pick(labels), severity())]
    if float(torch.rand((), generator=generator)) < 2 / 3:
        chain = [f for f in pick(REALISTIC_CHAINS) if f in labels]
    else:
        first, second = pick(labels), pick(labels)
        chain = [first] if first == second else [first, second]
    return [(f, severity()) for f in chain]


def degrade(clean: torch.Tensor, recipe: list[tuple[str, float]], generator: torch.Generator) -> torch.Tensor:
    """One (1, 3, H, W) crop through the recipe's families in order."""
    x = clean
    for family_name, sev in recipe:
        family = degradations.get(family_name)
        x = family(x, family.sample(sev, generator))
    return x


# below this severity a family is only partly "present" (a soft target rising linearly from 0): contrast at
# severity 0.05 (factor 0.96) or a colour cast of 2% is no different from a clean photo of its own, and hard
# labels there teach the network to hedge on every image
FULLY_PRESENT = 0.15


def targets(recipe: list[tuple[str, float]], labels: tuple[str, ...] = LABELS
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(present (L,), severity (L,)) for a recipe; a family named twice keeps its strongest severity."""
    present, sev = torch.zeros(len(labels)), torch.zeros(len(labels))
    for family_name, s in recipe:
        i = labels.index(family_name)
        present[i] = max(float(present[i]), min(1.0, s / FULLY_PRESENT))
        sev[i] = max(float(sev[i]), s)
    return present, sev


def batch(clean: torch.Tensor, generator: torch.Generator, labels: tuple[str, ...] = LABELS
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3, P, P) clean crops -> (degraded, present (N, L), severity (N, L))."""
    xs, ps, ss = [], [], []
    for crop in clean.split(1):
        recipe = draw_recipe(generator, labels)
        xs.append(degrade(crop, recipe, generator))
        p, s = targets(recipe, labels)
        ps.append(p)
        ss.append(s)
    return torch.cat(xs), torch.stack(ps), torch.stack(ss)
