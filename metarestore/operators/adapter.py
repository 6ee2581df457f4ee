"""``fit_adapter``: few-shot adaptation that picks, per adapter, how to use the support pairs.

Candidates (``paths.default_paths``): the restorer as is (zero-shot), gradient adaptation of an adapter
kind (``learner.adapt(kind=...)``: FiLM, LoRA, ...), and operator + prior paths, where an operator fitted
on the pairs (``operators.base.Operator``: blur kernel, tone/colour model, haze, ...) is undone first and
the restorer cleans up, optionally adapted too; plus the classical Wiener / Richardson-Lucy with the same
fitted kernel. The choice is made by held-out validation, in pieces:

- ``folds``: leave-one-out, or the halves of a single pair (no folds: too small, the adapter stays zero-shot);
- ``scoring``: a candidate's held-out PSNR on a fold (``metarestore.metrics.psnr``, what evaluation reports);
- ``selection``: the staged selection (plain paths, repeats and refinements, adapted paths within a budget);
- ``storage``: the adapter's bytes (safetensors, never a pickle).

The chosen path (or the one forced) is then fitted on all pairs; an adapted one validated with the final
fit's steps keeps the average of its fold states instead (each fold's fitted on all pairs but the one it
held out, so together they saw every pair): the same cost as validating it, no second fit.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path as FsPath

import torch

from metarestore.meta.adapt import FIT_OPTIMIZER
from metarestore.operators import storage
from metarestore.operators.folds import MIN_HALF, FoldCallback, make_folds, split_halves
from metarestore.operators.noise import fit_noise
from metarestore.operators.paths import Operators, Path, default_paths, pre_step
from metarestore.operators.scoring import psnr, told_passes
from metarestore.operators.selection import HELPS_DB, Budget, Fit, Selection, select
from metarestore.operators.storage import AdapterError

__all__ = ["HELPS_DB", "MIN_HALF", "MIN_SIDE", "Adapter", "AdapterError", "FoldCallback", "fit_adapter", "psnr",
           "read_adapter", "split_halves"]

ADAPTER_FILE = "adapter.safetensors"
INFO_FILE = "adapter.json"
MIN_SIDE = 8  # pairs smaller than this a side hold too few pixels to fit a noise level, a kernel or a curve


@dataclass
class Adapter:
    learner: object  # MetaLearner: the prior; not stored with the adapter
    path: Path
    operators: Operators = field(default_factory=Operators)
    params: dict[str, torch.Tensor] | None = None  # the adapted state of the kind ``path.restorer`` names
    info: dict = field(default_factory=dict)

    @property
    def film(self) -> dict[str, torch.Tensor] | None:
        """The adapted state under its former name (FiLM was the only kind)."""
        return self.params

    @torch.no_grad()
    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Restore a (B, C, H, W) batch in [0, 1]."""
        pre = pre_step(self.path, self.operators, x, self.learner)
        if self.path.restorer == "none":
            return pre.clamp(0, 1)
        if not self.path.adapted:
            return told_passes(self.learner, pre, self.path)
        return self.learner.restore(pre, self.params, kind=self.path.restorer, family=self.path.told)

    def to_bytes(self) -> bytes:
        return storage.to_bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes, learner) -> Adapter:
        return cls(learner, *storage.from_bytes(data, learner))

    def save(self, directory: str | FsPath) -> FsPath:
        """Write adapter.safetensors (everything) and adapter.json (the info, for people)."""
        directory = FsPath(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (ADAPTER_FILE + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(directory / ADAPTER_FILE)  # never a half-written adapter
        (directory / INFO_FILE).write_text(json.dumps(self.info, indent=2) + "\n")
        return directory / ADAPTER_FILE

    @classmethod
    def load(cls, directory: str | FsPath, learner) -> Adapter:
        return cls.from_bytes((FsPath(directory) / ADAPTER_FILE).read_bytes(), learner)


def read_adapter(data: bytes, learner) -> Adapter:
    """An adapter from its bytes: ``Adapter.to_bytes``' format, or a plain safetensors file of FiLM deltas
    (what servers stored before operator adapters), read as the ``film`` path."""
    try:
        return Adapter.from_bytes(data, learner)
    except AdapterError as exc:
        problem = str(exc)
    return Adapter(learner, Path(restorer="film"), params=storage.read_film_deltas(data, learner, problem))


def _check_support(support_x: torch.Tensor, support_y: torch.Tensor) -> None:
    if support_x.ndim != 4 or support_x.shape != support_y.shape or support_x.shape[0] < 1:
        raise AdapterError(f"support pairs must be two (K, C, H, W) batches of one shape, got "
                           f"{tuple(support_x.shape)} and {tuple(support_y.shape)}")
    if min(support_x.shape[-2:]) < MIN_SIDE:
        h, w = support_x.shape[-2:]
        raise AdapterError(f"pairs of {w}x{h} pixels are too small to fit: at least {MIN_SIDE}x{MIN_SIDE}")
    if not (torch.is_floating_point(support_x) and torch.is_floating_point(support_y)):
        raise AdapterError("support images must be float tensors in [0, 1]")


def _candidates(learner, paths: Iterable[str | Path] | None, channels: int | None) -> list[Path]:
    """The candidate paths, parsed, without those whose operator does not model ``channels`` channels
    (None: keep every one)."""
    try:
        candidates = [p if isinstance(p, Path) else Path.parse(p) for p in (paths or default_paths(learner))]
        candidates = [p for p in candidates if p.operator is None or p.operator.channels in (None, channels)
                      or channels is None]
        for p in candidates:
            learner.hint(p.told)  # told:F needs a model that can be told F
    except ValueError as exc:
        raise AdapterError(str(exc)) from None
    if not candidates:
        raise AdapterError("no adaptation path to choose from")
    return candidates


def fit_adapter(learner, support_x: torch.Tensor, support_y: torch.Tensor, *,
                paths: Iterable[str | Path] | None = None, force: str | Path | None = None, steps: int = 10,
                max_folds: int = 5, on_fold: FoldCallback | None = None, patch: int | None = None,
                validation_steps: int | None = None, budget_s: float | None = None,
                score_side: int | None = None, optimizer: str = FIT_OPTIMIZER) -> Adapter:
    """Fit an adapter from K (degraded ``support_x``, clean ``support_y``) pairs, (K, C, H, W) in [0, 1].

    ``paths``: the candidates (names such as ``"film"``, ``"lora"``, ``"deconv@0.01+film"``, ``"told:jpeg"``;
    default: ``default_paths(learner)``); a single one is used as is (no validation). ``force``: the path to
    use whatever its score (it is added to the candidates), the others validated beside it so that the
    info reports its honest held-out score. ``steps``: gradient steps of the chosen adapted restorer;
    ``validation_steps`` (default ``steps``): those of every adapted candidate in validation (equal to
    ``steps``, the chosen path's adapted state is the average of its validated fold states). With
    ``patch``, each step sees one random window of that size per pair (``MetaLearner.adapt``). With
    ``score_side``, candidates are scored on one ``score_side`` px window of each held-out pair (a corner
    per fold). ``optimizer``: the update of every gradient step (``MetaLearner.adapt``): ``adam`` by default,
    steady where the meta-learned SGD rates diverge (LoRA on posterized pairs), ``sgd`` for those rates.
    ``budget_s``: wall-clock seconds for the whole fit, the final fit included (``selection.Budget``; a
    skipped candidate is never chosen); None: no budget (deterministic). ``on_fold(fit_indices,
    held_out_index)`` is called for every fold of every stage that runs, so that callers (and tests) can
    check that no fold scores a pair it fitted on."""
    budget = Budget(budget_s)
    start = time.perf_counter()
    _check_support(support_x, support_y)
    if force is not None:
        force = _candidates(learner, [force], None)[0]
        paths = [force, *(p for p in (paths or default_paths(learner)) if str(getattr(p, "name", p)) != force.name)]
    candidates = _candidates(learner, paths, support_x.shape[1])
    if force is not None and force not in candidates:
        raise AdapterError(f"path {force.name} does not apply to {support_x.shape[1]}-channel images")
    force = candidates[0] if len(candidates) == 1 else force
    folds, scheme = make_folds(support_x, support_y, max_folds, score_side) if len(candidates) > 1 else ([], "forced")
    validation_steps = steps if validation_steps is None else validation_steps
    fit = Fit(steps, validation_steps, patch, int(support_x.shape[0]), optimizer)
    sel = select(learner, candidates, folds, fit, budget, on_fold)
    chosen = force or (sel.best() if folds else Path())
    ops = Operators.fit(support_y, support_x, {chosen.operator} if chosen.operator else set())
    try:
        ops.prepare(chosen, learner)  # a synthetic path trains now, so that the adapter can be stored
    except ValueError as exc:
        raise AdapterError(str(exc)) from None
    params = sel.fold_average(chosen.name) if chosen.adapted and fit.keeps_folds else None
    kept = params is not None
    if chosen.adapted and not kept:
        params = learner.adapt(pre_step(chosen, ops, support_x, learner), support_y, steps=steps,
                               kind=chosen.restorer, patch=patch, family=chosen.told, optimizer=optimizer)
    params = None if params is None else {n: p.detach() for n, p in params.items()}
    info = _info(chosen, sel, ops, support_x, support_y, scheme, len(folds), fit)
    if chosen.adapted:
        info["final_fit"] = "fold average" if kept else "all pairs"
    info["fit_ms"] = round((time.perf_counter() - start) * 1000, 1)
    return Adapter(learner, chosen, ops, params, info)


def _info(chosen: Path, sel: Selection, ops: Operators, support_x: torch.Tensor, support_y: torch.Tensor,
          scheme: str, folds: int, fit: Fit) -> dict:
    """What the fit tells a person: the path, the held-out PSNR of the input, zero-shot and every
    candidate, the operators' residuals and the noise around the chosen operator's prediction."""
    fit_ops = ops.fits.get(chosen.operator.name) if chosen.operator is not None else None
    predicted = support_y if fit_ops is None else fit_ops.predict(support_y)
    return {
        "path": chosen.name, "shots": int(support_x.shape[0]), "validation": scheme, "folds": folds,
        "steps": fit.steps if chosen.adapted else 0,
        "validation_steps": fit.validation_steps if chosen.adapted and folds else 0,
        "psnr_before": _finite(sum(sel.before) / len(sel.before)) if sel.before else None,
        "psnr_after": _finite(sel.mean(chosen.name)) if folds else None,
        "psnr_zero_shot": _finite(sel.mean(Path().name)) if folds else None,
        "scores": {name: _finite(sel.mean(name)) for name in sel.scores} if folds else {},
        "skipped": sel.skipped, "ruled_out": sorted(sel.ruled_out), "residuals": ops.residuals,
        "noise": fit_noise(predicted.double(), support_x.double()).as_dict(),
    }


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)
