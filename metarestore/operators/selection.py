"""The staged selection of an adapter's path: every candidate scored on held-out folds, cheapest first,
and the costly ones only where a cheaper one shows they can help.

1. plain: the operators fitted on each fold's fit pairs; the paths without gradient steps (forward
   passes only) scored; candidates that a closed-form check on every fold's operators rules out
   (``Operator.cannot_help``: the identity kernel of a colour cast) are never scored.
2. repeats: ``told:F*2`` .. ``told:F*MAX_PASSES`` for the best told path when it helps (pairs more
   degraded than the training's range want more than one pass); then the pre-steps that refine another
   (``Operator.refines``: hqs and rl on deconv), only where that one helps.
3. adapted: the gradient-adapted paths, each only on a pre-step that helps by itself (``HELPS_DB`` over
   zero-shot), best pre-step first, every candidate's folds in one batched adaptation, within the
   wall-clock ``Budget`` (a candidate that would pass it is stopped or not started: skipped, never chosen).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from metarestore.meta.adapt import FIT_OPTIMIZER
from metarestore.model.kinds import KINDS
from metarestore.operators.catalog import REFINES
from metarestore.operators.folds import Fold, FoldCallback, each_fold
from metarestore.operators.paths import MAX_PASSES, Operators, Path
from metarestore.operators.scoring import FAILURES, psnr, score_adapted, score_plain

HELPS_DB = 0.1  # what a pre-step must gain over zero-shot, held out, before costlier paths build on it


@dataclass
class Budget:
    """Wall-clock seconds for a whole fit (None: no budget, deterministic), counted from ``begun``."""

    seconds: float | None
    begun: float = field(default_factory=lambda: time.perf_counter())

    def spent(self) -> float:
        return time.perf_counter() - self.begun

    def passes(self, extra: float = 0.0) -> bool:
        """Whether the time spent plus ``extra`` seconds would pass the budget."""
        return self.seconds is not None and self.spent() + extra > self.seconds


@dataclass
class Selection:
    """The candidates (those a stage adds included), their held-out scores per fold, and why some have none."""

    candidates: list[Path]
    scores: dict[str, list[float]]
    before: list[float] = field(default_factory=list)  # the degraded input's PSNR per fold
    skipped: list[str] = field(default_factory=list)  # not validated within the budget
    ruled_out: set[str] = field(default_factory=set)
    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # adapted paths' fold states

    def fold_average(self, name: str) -> dict[str, torch.Tensor] | None:
        """The mean of an adapted path's fold states (each fitted on its fold's pairs; together they saw
        every pair), or None when it was not validated. For LoRA the mean of the factors, not of their products:
        close for fits of a few steps that start from the same ``A`` (``B`` at zero)."""
        states = self.states.get(name)
        return None if states is None else {n: v.mean(0) for n, v in states.items()}

    def mean(self, name: str) -> float:
        values = self.scores.get(name)
        return sum(values) / len(values) if values else float("nan")

    def best(self) -> Path:
        """The best mean held-out PSNR; ties keep the earlier (simpler) candidate; never an unscored one."""
        return max(self.candidates, key=lambda p: (self.mean(p.name) if self.scores[p.name] else float("-inf"),
                                                   -self.candidates.index(p)))

    def add(self, scores: dict[str, float]) -> None:
        for name, score in scores.items():
            self.scores.setdefault(name, []).append(score)


@dataclass
class Fit:
    """What the adapted stage needs to know of the final fit: its gradient steps, and those per candidate."""

    steps: int
    validation_steps: int
    patch: int | None
    pairs: int  # support pairs the final fit adapts on
    optimizer: str = FIT_OPTIMIZER  # the update of every fit (``MetaLearner.adapt``): validation's and the final one

    @property
    def keeps_folds(self) -> bool:
        """Whether the validated fold states are the final fit (their average): validation takes the
        final fit's steps, so fitting again on all pairs would repeat the work."""
        return self.validation_steps == self.steps


def select(learner, candidates: list[Path], folds: list[Fold], fit: Fit, budget: Budget,
           on_fold: FoldCallback | None = None) -> Selection:
    """Score ``candidates`` on ``folds`` in stages (plain, repeats and refinements, adapted)."""
    sel = Selection(list(candidates), {p.name: [] for p in candidates})
    if not folds:
        return sel
    fitted = []
    needed = {p.operator for p in candidates if p.operator is not None}
    for _, fold in each_fold(folds, on_fold):
        fitted.append(Operators.fit(fold.fit_y, fold.fit_x, needed))
        sel.before.append(psnr(fold.held_x, fold.held_y))
    sel.ruled_out = ruled_out(candidates, fitted)
    held_pres: list[dict] = [{} for _ in folds]  # per fold: pre-stepped held-out images, for the adapted paths
    plain = _plain_stages(learner, sel, folds, fitted, held_pres, budget, on_fold)
    adapted = _adapted_candidates(sel, plain)
    if adapted:
        for _ in each_fold(folds, on_fold):
            pass
    _adapted_stage(learner, sel, adapted, folds, fitted, held_pres, fit, budget)
    return sel


def _plain_stages(learner, sel: Selection, folds: list[Fold], fitted: list[Operators], held_pres: list[dict],
                  budget: Budget, on_fold: FoldCallback | None) -> list[Path]:
    """Stages 1 and 2; returns the plain paths scored (or skipped)."""
    def stage(paths: list[Path], announce: FoldCallback | None) -> None:
        for n, fold in (each_fold(folds, announce) if paths else ()):
            sel.add(score_plain(learner, paths, fitted[n], fold.held_x, fold.held_y, held_pres[n]))

    plain = [p for p in sel.candidates if not p.adapted and p.name not in sel.ruled_out]
    first = [p for p in plain if p.pre not in REFINES]
    stage(first, None)  # its folds were announced while their operators were fitted
    repeats = _repeat_told(sel.candidates, sel.scores)
    stage(repeats, on_fold)
    sel.candidates += repeats
    plain += repeats
    refining = [p for p in plain if p.pre in REFINES and _pre_helps(REFINES[p.pre], first, sel.scores)]
    if refining and budget.passes():
        sel.skipped += [p.name for p in refining]  # the budget is spent: never chosen, listed as skipped
        refining = []
    stage(refining, on_fold)
    return plain


def _adapted_candidates(sel: Selection, plain: list[Path]) -> list[Path]:
    """The adapted paths worth validating, best pre-step first (stable: ties keep the candidates' order)."""
    adapted = [p for p in sel.candidates if p.adapted and p.name not in sel.ruled_out
               and _pre_helps(p.pre, plain, sel.scores) and _told_helps(p, sel.scores)]
    polish = _polish_told(sel.candidates, sel.scores)  # the best told path, if it helps: FiLM on top of it too
    if polish is not None:
        sel.candidates.append(polish)
        sel.scores[polish.name] = []
        adapted.append(polish)
    return sorted(adapted, key=lambda p: -_base_score(p, plain, sel.scores))


class OutOfBudget(Exception):
    """A candidate's validation stopped: finishing it (and the final fit it would need) would pass the budget."""


def _adapted_stage(learner, sel: Selection, adapted: list[Path], folds: list[Fold], fitted: list[Operators],
                   held_pres: list[dict], fit: Fit, budget: Budget) -> None:
    """Stage 3 within the budget, candidates in order. A candidate's validation is stopped (the candidate
    skipped, never chosen) as soon as its own measured steps predict that finishing it, and the final fit it
    would need, would pass the budget; one that an earlier candidate of the same kind predicts to pass it is
    not started. No step is spent on timing alone: a validation that fits goes on from its first step."""
    windows = sum(int(f.fit_x.shape[0]) for f in folds)  # fit pairs over the folds: one window each per step
    final = 0 if fit.keeps_folds else fit.steps * fit.pairs / windows  # a final fit's steps, in fold-steps
    per_step: dict[str, float] = {}  # seconds per gradient step over all folds' windows, by adapter kind
    for path in adapted:
        if budget.passes(per_step.get(path.restorer, 0.0) * (fit.validation_steps + final)):
            sel.skipped.append(path.name)
            continue
        begun = time.perf_counter()

        def within_budget(done: int, begun: float = begun, kind: str = path.restorer) -> None:
            per_step[kind] = (time.perf_counter() - begun) / done  # from the steps taken, stopped or not
            if budget.passes(per_step[kind] * (fit.validation_steps - done + final)):
                raise OutOfBudget

        try:
            sel.scores[path.name], sel.states[path.name] = score_adapted(
                learner, path, folds, fitted, fit.validation_steps, fit.patch, held_pres, fit.optimizer,
                on_step=within_budget if budget.seconds is not None else None)
        except OutOfBudget:
            sel.skipped.append(path.name)
        except FAILURES:
            sel.scores[path.name] = [float("-inf")] * len(folds)


def ruled_out(candidates: list[Path], fitted: list[Operators]) -> set[str]:
    """Candidates whose operator's fit shows in every fold that it cannot help (``cannot_help``: the kernel
    paths where every fold's kernel is the identity: nothing to deconvolve, they could only smooth)."""
    out: set[str] = set()
    for op in {p.operator for p in candidates if p.operator is not None}:
        fits = [ops.fits.get(op.name) for ops in fitted]
        if fits and all(f is not None and f.cannot_help for f in fits):
            out |= {p.name for p in candidates if p.operator is op}
    return out


def _mean(values: list[float] | None) -> float:
    return sum(values) / len(values) if values else float("-inf")


def _best_plain(pre: str, plain: list[Path], scores: dict[str, list[float]], restorer: str | None = None,
                told: str | None | bool = False) -> float | None:
    """The best mean held-out PSNR of the scored plain paths with pre-step ``pre`` (and ``restorer``; and
    ``told``, None for blind, unless False: any)."""
    means = [sum(scores[p.name]) / len(scores[p.name]) for p in plain
             if p.pre == pre and restorer in (None, p.restorer) and told in (False, p.told) and scores[p.name]]
    return max(means) if means else None


def _base_score(path: Path, plain: list[Path], scores: dict[str, list[float]]) -> float:
    """The mean held-out PSNR of the plain path an adapted ``path`` starts from: its pre-step, then the
    network told what it is told (blind: zero-shot, for FiLM alone; ``told:F`` for ``told:F+film``)."""
    best = _best_plain(path.pre, plain, scores, restorer="net", told=path.told)
    return float("-inf") if best is None else best


def _pre_helps(pre: str, plain: list[Path], scores: dict[str, list[float]]) -> bool:
    """Whether some plain path with pre-step ``pre`` beat zero-shot on the held-out pairs by ``HELPS_DB``:
    paths that build on a pre-step polish an inversion that works, they do not rescue one that does not,
    and each costs as much as all the plain paths together."""
    if pre == "none":
        return True
    zero = scores.get(Path().name)
    if not zero:
        return True  # nothing to compare with: validate it
    best = _best_plain(pre, plain, scores)
    if best is None:  # its plain paths were skipped (they did not help) or are not candidates (validate it)
        return not any(p.pre == pre for p in plain)
    return best > sum(zero) / len(zero) + HELPS_DB


def _told_helps(path: Path, scores: dict[str, list[float]]) -> bool:
    """An adapted told path (``told:F+film``) is validated only where ``told:F`` alone beat zero-shot."""
    if path.told is None:
        return True
    return _mean(scores.get(Path(told=path.told).name)) > _mean(scores.get(Path().name)) + HELPS_DB


def _best_told(candidates: list[Path], scores: dict[str, list[float]], one_pass: bool = False) -> Path | None:
    """The best-scoring scored told path without gradient steps (``one_pass``: of one pass), if its family
    told in one pass beat zero-shot by ``HELPS_DB``."""
    told = [p for p in candidates if p.told is not None and not p.adapted and scores.get(p.name)
            and (p.passes == 1 or not one_pass)]
    if not told:
        return None
    best = max(told, key=lambda p: _mean(scores[p.name]))
    return best if _told_helps(best, scores) else None


def _repeat_told(candidates: list[Path], scores: dict[str, list[float]]) -> list[Path]:
    """``told:F*2`` .. ``told:F*MAX_PASSES`` for the best one-pass ``told:F`` that helps (forward passes
    only; those already among the candidates are not added twice)."""
    best = _best_told(candidates, scores, one_pass=True)
    if best is None:
        return []
    names = {p.name for p in candidates}
    return [r for n in range(2, MAX_PASSES + 1) if (r := Path(told=best.told, passes=n)).name not in names]


def _polish_told(candidates: list[Path], scores: dict[str, list[float]]) -> Path | None:
    """``told:F+film`` for the best plain ``told:F`` that helps, unless a candidate already: FiLM steps
    polish the family the pairs look like (one adapted candidate more, not one per family)."""
    best = _best_told(candidates, scores)
    if best is None or "film" not in KINDS:
        return None
    polish = Path(restorer="film", told=best.told)
    return None if any(p.name == polish.name for p in candidates) else polish
