"""``fit_adapter``: few-shot adaptation that picks, per adapter, how to use the support pairs.

Candidates (``paths.default_paths``): the restorer as is (zero-shot), gradient adaptation of an adapter
kind (``learner.adapt(kind=...)``: FiLM, LoRA, ...), and operator + prior paths, where an operator fitted
on the pairs (blur kernel, tone/colour model, haze) is undone first and the restorer cleans up, optionally
adapted too; plus the classical Wiener / Richardson-Lucy with the same fitted kernel. The choice is made by
held-out validation: with K >= 2 pairs, leave-one-out (everything, operators and adaptation alike, is
fitted on K-1 pairs and scored
on the pair left out; at most ``max_folds`` folds); with K = 1, the single pair is cut into two halves
along its longer side and each half is scored with what was fitted on the other; when the halves would
be too small (< 32 px), nothing can be validated and the adapter falls back to zero-shot (the base model
is never made worse unseen). Paths without gradient steps are scored first, every fold's candidates in
one batched forward pass; an adapted path on an operator pre-step (``deconv@0.01+film``), and ``hqs``
(which refines ``deconv`` with the restorer), are scored only if that pre-step alone beat zero-shot
(otherwise their score is reported as null). The adapted candidates are validated best pre-step first, each with all its
folds adapted at once on ``adapt()``'s task dimension, optionally with fewer steps than the final fit
(``validation_steps``) and within a wall-clock budget (``budget_s``: a candidate that would pass it is
skipped, never chosen). The chosen path is then refitted on all pairs.

An adapter serialises to safetensors (tensors plus a JSON header, never a pickle).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path as FsPath

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from metarestore.errors import UserError
from metarestore.model.kinds import KINDS, get_kind
from metarestore.operators.haze import HazeFit
from metarestore.operators.kernel import MAX_KERNEL, KernelFit
from metarestore.operators.noise import fit_noise
from metarestore.operators.paths import MAX_PASSES, Operators, Path, default_paths, pre_step
from metarestore.operators.tone import KNOTS, ToneFit
from metarestore.pixels import center_crop

FORMAT = "metarestore-operator-adapter"
VERSION = 1
MIN_HALF = 32
HELPS_DB = 0.1  # what a pre-step must gain over zero-shot, held out, before adapted paths build on it
REFINES = {"hqs": "deconv", "rl": "deconv"}  # pre-steps scored only where the one they refine helps
ADAPTER_FILE = "adapter.safetensors"
INFO_FILE = "adapter.json"

FoldCallback = Callable[[list[int], int], None]


class AdapterError(UserError, ValueError):
    """Support pairs or a stored adapter that cannot be used."""


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.clamp(0, 1).double() - b.double()).square().mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


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

    # storage --------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        ops = self.operators
        if ops.kernel is not None:
            tensors["kernel"] = ops.kernel.kernel.float().contiguous()
        if ops.tone is not None:
            tensors["tone.curves"] = ops.tone.curves.float().contiguous()
            tensors["tone.matrix"] = ops.tone.matrix.float().contiguous()
            tensors["tone.offset"] = ops.tone.offset.float().contiguous()
        if ops.haze is not None:
            tensors["haze.airlight"] = ops.haze.airlight.float().contiguous()
        tensors.update(ops.tensors())  # a synthetic path's retrained network
        for name, value in (self.params or {}).items():  # e.g. film.<parameter>, lora.<module>.lora_a
            tensors[f"{self.path.restorer}.{name}"] = value.detach().float().cpu().contiguous()
        header = {"format": FORMAT, "version": VERSION, "path": self.path.name, "residuals": ops.residuals,
                  "haze_omega": ops.haze.omega if ops.haze is not None else None, "info": self.info,
                  "synthetic": ops.header()}
        return st_save(tensors, metadata={"adapter": json.dumps(header)})

    @classmethod
    def from_bytes(cls, data: bytes, learner) -> Adapter:
        try:
            tensors = st_load(data)
            header = json.loads(_metadata(data)["adapter"])
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad adapter
            raise AdapterError(f"not a metarestore operator adapter: {exc}") from None
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise AdapterError("not a metarestore operator adapter (format/version mismatch)")
        try:
            path = Path.parse(str(header["path"]))
            learner.hint(path.told)
        except ValueError as exc:
            raise AdapterError(str(exc)) from None
        residuals = {str(k): float(v) for k, v in header.get("residuals", {}).items()}
        ops = Operators(residuals=residuals)
        if "kernel" in tensors:
            k = tensors["kernel"].double()
            if k.ndim not in (2, 3) or k.shape[-1] != k.shape[-2] or k.shape[-1] % 2 == 0 or k.shape[-1] > MAX_KERNEL:
                raise AdapterError(f"bad kernel shape {tuple(k.shape)}")
            ops.kernel = KernelFit(k, residuals.get("kernel", float("nan")))
        if "tone.curves" in tensors:
            curves, matrix, offset = (tensors.get(f"tone.{n}") for n in ("curves", "matrix", "offset"))
            if matrix is None or offset is None or curves.shape[-1] != KNOTS or \
                    matrix.shape != (curves.shape[0], curves.shape[0]) or offset.shape != (curves.shape[0],):
                raise AdapterError("bad tone model tensors")
            ops.tone = ToneFit(curves.double(), matrix.double(), offset.double(), residuals.get("tone", float("nan")))
        if "haze.airlight" in tensors:
            ops.haze = HazeFit(tensors["haze.airlight"], float(header.get("haze_omega") or 0.95),
                               residuals.get("haze", float("nan")))
        try:
            ops.read(header.get("synthetic") or {}, tensors, learner)
        except ValueError as exc:
            raise AdapterError(str(exc)) from None
        if path.operator is not None and getattr(ops, path.operator) is None:
            raise AdapterError(f"path {path.name} needs the {path.operator} operator, which is missing")
        params = None
        if path.adapted:
            prefix = f"{path.restorer}."
            params = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                get_kind(path.restorer).check(learner.model, params)
            except ValueError as exc:
                raise AdapterError(f"the adapted {path.restorer} state does not fit this model: {exc}") from None
            own = next(learner.model.parameters())
            params = {n: v.to(own.device, own.dtype) for n, v in params.items()}
        return cls(learner, path, ops, params, header.get("info", {}))

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
    (parameter name -> adapted minus meta-learned value: what ``meta.adapt.delta`` gives, and what servers
    stored before operator adapters), read as the ``film`` path."""
    from metarestore.meta.adapt import apply_delta

    try:
        return Adapter.from_bytes(data, learner)
    except AdapterError as exc:
        problem = str(exc)
    try:
        tensors = st_load(data)
    except Exception as exc:  # noqa: BLE001 - not safetensors at all
        raise AdapterError(f"not a safetensors adapter ({str(exc)[:120]})") from None
    if not tensors:
        raise AdapterError(f"the adapter holds no tensors ({problem})")
    own = dict(learner.model.named_parameters())
    for name, value in tensors.items():
        if name not in own:
            raise AdapterError(f"the adapter does not fit this model: it has no parameter {name!r}")
        if value.shape != own[name].shape:
            raise AdapterError(f"the adapter does not fit this model: {name} is {tuple(value.shape)}, the "
                               f"model's is {tuple(own[name].shape)}")
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise AdapterError(f"the adapter's {name} is not a finite floating-point tensor")
    return Adapter(learner, Path(restorer="film"), params=apply_delta(learner.model, tensors, "film"))


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its JSON header, 8-byte little-endian length first)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n].decode("utf-8")).get("__metadata__", {})


# fitting ------------------------------------------------------------------------------------------
MIN_SIDE = 8  # pairs smaller than this a side hold too few pixels to fit a noise level, a kernel or a curve


def _check_support(support_x: torch.Tensor, support_y: torch.Tensor) -> None:
    if support_x.ndim != 4 or support_x.shape != support_y.shape or support_x.shape[0] < 1:
        raise AdapterError(f"support pairs must be two (K, C, H, W) batches of one shape, got "
                           f"{tuple(support_x.shape)} and {tuple(support_y.shape)}")
    if min(support_x.shape[-2:]) < MIN_SIDE:
        h, w = support_x.shape[-2:]
        raise AdapterError(f"pairs of {w}x{h} pixels are too small to fit: at least {MIN_SIDE}x{MIN_SIDE}")
    if not (torch.is_floating_point(support_x) and torch.is_floating_point(support_y)):
        raise AdapterError("support images must be float tensors in [0, 1]")


def split_halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, C, H, W) image cut in two along its longer side (two same-size halves)."""
    h, w = x.shape[-2:]
    if w >= h:
        half = w // 2
        return x[..., :half], x[..., half:2 * half]
    half = h // 2
    return x[..., :half, :], x[..., half:2 * half, :]


def _folds(support_x, support_y, max_folds: int):
    """(fit_x, fit_y, held_x, held_y, fit_indices, held_index) per validation fold, and the scheme."""
    k = support_x.shape[0]
    if k >= 2:
        out = []
        for i in range(min(k, max_folds)):
            fit = [j for j in range(k) if j != i]
            out.append((support_x[fit], support_y[fit], support_x[i:i + 1], support_y[i:i + 1], fit, i))
        return out, "leave-one-out"
    if min(split_halves(support_x)[0].shape[-2:]) < MIN_HALF:
        return [], "none (one pair too small to split: zero-shot)"
    xs, ys = split_halves(support_x), split_halves(support_y)
    # indices name the halves: 0 and 1 of the single pair
    return [(xs[0], ys[0], xs[1], ys[1], [0], 1), (xs[1], ys[1], xs[0], ys[0], [1], 0)], "split-halves"


def _pre_key(path: Path) -> tuple[str, float]:
    """What a pre-step's result depends on besides the fold (its operators) and the image."""
    return path.pre, path.balance


def _plain_scores(learner, paths: list[Path], ops: Operators, held_x: torch.Tensor,
                  held_y: torch.Tensor, cache: dict | None = None) -> dict[str, float]:
    """Held-out PSNR of paths without gradient steps on one fold, their operators fitted on the other
    pairs; the network restores every path's pre-stepped image in one batched forward pass. ``cache``
    (per fold) keeps the pre-stepped held-out images for the adapted paths on the same pre-steps."""
    pres: dict[str, torch.Tensor] = {}
    scores: dict[str, float] = {}
    for path in paths:
        try:
            pres[path.name] = pre_step(path, ops, held_x, learner)
        except (ValueError, RuntimeError, torch.linalg.LinAlgError):
            scores[path.name] = float("-inf")
            continue
        if cache is not None:
            cache[_pre_key(path)] = pres[path.name]
    net = [p for p in paths if p.name in pres and p.restorer == "net" and p.told is None]
    if net:
        out = learner.restore(torch.cat([pres[p.name] for p in net]))
        scores.update({p.name: psnr(out[i:i + 1], held_y) for i, p in enumerate(net)})
    for p in paths:  # told the family: a pass of its own (one hint per forward pass)
        if p.told is not None:
            scores[p.name] = psnr(told_passes(learner, pres[p.name], p), held_y)
    scores.update({p.name: psnr(pres[p.name], held_y) for p in paths if p.name in pres and p.restorer == "none"})
    return scores


def _validate_adapted(learner, path: Path, folds: list, fitted: list[Operators], steps: int,
                      patch: int | None, held_pres: list[dict] | None = None) -> list[float]:
    """Held-out PSNR of an adapted path in every fold, all folds adapted at once: the pre-stepped fit pairs
    of the folds are stacked on ``adapt()``'s task dimension (fold t's state is fitted on fold t's pairs
    only, with its own operators and windows), then every fold's held-out pair is restored with its own
    state in one batched forward."""
    fit_x = torch.stack([pre_step(path, fitted[n], f[0], learner) for n, f in enumerate(folds)])
    fit_y = torch.stack([f[1] for f in folds])
    params = _detach(learner.adapt(fit_x, fit_y, steps=steps, kind=path.restorer, patch=patch, family=path.told))
    held_pres = held_pres or [{} for _ in folds]
    held = torch.stack([held_pres[n][_pre_key(path)] if _pre_key(path) in held_pres[n]
                        else pre_step(path, fitted[n], f[2], learner) for n, f in enumerate(folds)])
    out = learner.restore(held, params, kind=path.restorer, family=path.told)
    return [psnr(out[n], f[3]) for n, f in enumerate(folds)]


def _pre_helps(pre: str, plain: list[Path], scores: dict[str, list[float]]) -> bool:
    """Whether some plain path with pre-step ``pre`` beat zero-shot on the held-out pairs by ``HELPS_DB``.
    Paths that build on a pre-step (``deconv@0.01+film``, and ``hqs``, which refines ``deconv`` with the
    restorer) are scored only where it helps: they polish an inversion that works, they do not rescue one
    that does not, and each costs as much as all the plain paths together."""
    if pre == "none":
        return True
    zero = scores.get(Path().name)
    if not zero:
        return True  # nothing to compare with: validate it
    best = _best_plain(pre, plain, scores)
    if best is None:  # its plain paths were skipped (they did not help) or are not candidates (validate it)
        return not any(p.pre == pre for p in plain)
    return best > sum(zero) / len(zero) + HELPS_DB


def told_passes(learner, x: torch.Tensor, path: Path) -> torch.Tensor:
    """The model as is (told ``path.told``, or blind) applied ``path.passes`` times."""
    for _ in range(path.passes):
        x = learner.restore(x, family=path.told)
    return x


def _repeat_told(candidates: list[Path], scores: dict[str, list[float]]) -> list[Path]:
    """``told:F*2`` .. ``told:F*MAX_PASSES`` for the best-scoring one-pass ``told:F`` when it beat zero-shot
    by ``HELPS_DB``: pairs more degraded than the training's range want more than one pass (forward passes
    only; those already among the candidates are not added twice)."""
    best = _best_told(candidates, scores, one_pass=True)
    if best is None:
        return []
    names = {p.name for p in candidates}
    return [r for n in range(2, MAX_PASSES + 1) if (r := Path(told=best.told, passes=n)).name not in names]


def _best_told(candidates: list[Path], scores: dict[str, list[float]], one_pass: bool = False) -> Path | None:
    """The best-scoring scored told path without gradient steps (``one_pass``: of one pass), if its family told
    in one pass beat zero-shot by ``HELPS_DB``."""
    told = [p for p in candidates if p.told is not None and not p.adapted and scores.get(p.name)
            and (p.passes == 1 or not one_pass)]
    if not told:
        return None
    best = max(told, key=lambda p: _mean(scores[p.name]))
    return best if _told_helps(best, scores) else None


def _told_helps(path: Path, scores: dict[str, list[float]]) -> bool:
    """An adapted told path (``told:F+film``) is validated only where ``told:F`` alone beat zero-shot."""
    if path.told is None:
        return True
    return _mean(scores.get(Path(told=path.told).name)) > _mean(scores.get(Path().name)) + HELPS_DB


def _polish_told(candidates: list[Path], scores: dict[str, list[float]]) -> Path | None:
    """``told:F+film`` for the best-scoring plain ``told:F`` when it beat zero-shot by ``HELPS_DB`` and is
    not a candidate already: FiLM steps polish the family the pairs look like (one adapted candidate more,
    not one per family)."""
    best = _best_told(candidates, scores)
    if best is None or "film" not in KINDS:
        return None
    polish = Path(restorer="film", told=best.told)
    return None if any(p.name == polish.name for p in candidates) else polish


def _mean(values: list[float] | None) -> float:
    return sum(values) / len(values) if values else float("-inf")


def _best_plain(pre: str, plain: list[Path], scores: dict[str, list[float]],
                restorer: str | None = None) -> float | None:
    """The best mean held-out PSNR of the scored plain paths with pre-step ``pre`` (and ``restorer``)."""
    means = [sum(scores[p.name]) / len(scores[p.name]) for p in plain
             if p.pre == pre and restorer in (None, p.restorer) and scores[p.name]]
    return max(means) if means else None


def _detach(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in params.items()}


def fit_adapter(learner, support_x: torch.Tensor, support_y: torch.Tensor, *,
                paths: Iterable[str | Path] | None = None, steps: int = 10, max_folds: int = 5,
                on_fold: FoldCallback | None = None, patch: int | None = None,
                validation_steps: int | None = None, budget_s: float | None = None,
                score_side: int | None = None) -> Adapter:
    """Fit an adapter from K (degraded ``support_x``, clean ``support_y``) pairs, (K, C, H, W) in [0, 1].

    ``paths``: the candidates (names such as ``"film"``, ``"lora"``, ``"deconv@0.01+film"``, ``"told:jpeg"``;
    default: ``default_paths(learner)``), one path to force it (no validation). ``steps``: gradient steps of the chosen
    adapted restorer; ``validation_steps`` (default ``steps``): those of every adapted candidate in
    validation (fewer rank candidates nearly as well at a fraction of the cost). With ``patch``, each step
    sees one random window of that size per pair rather than the whole pairs (``MetaLearner.adapt``),
    which bounds a fit's cost whatever the images' size. The folds of one adapted candidate are adapted
    together (``adapt()``'s task dimension). With ``score_side``, every candidate is scored on the central
    ``score_side`` x ``score_side`` window of each held-out pair (the same pixels for all; pre-steps and
    forward passes then see that window only): what a path does to a uniform degradation shows on a
    window as well as on the whole, at a fraction of the forward passes.

    ``budget_s``: wall-clock seconds for the whole fit, the chosen path's final fit included. Adapted
    candidates are validated in the order of their pre-step's own held-out score (best first, so the most
    promising comes first), and one is skipped (score null, listed in the info's ``skipped``) when the
    time spent, plus its validation, plus the final fit it would need would pass the budget: both
    predicted from the measured cost of a gradient step (one timed step of the first candidate, then the
    previous candidate's validation). The paths that refine a pre-step (``hqs``) are skipped when the plain
    paths alone spent it; a skipped candidate is never chosen, so the choice is always among paths scored
    on held-out pairs. None: no budget (deterministic).

    ``on_fold(fit_indices, held_out_index)`` is called for every validation fold (in each of the two
    rounds: before a plain fold is scored, and for every fold before an adapted candidate's batched folds
    run), so callers (and tests) can check that no fold scores a pair it fitted on."""
    start = time.perf_counter()
    _check_support(support_x, support_y)
    candidates = [p if isinstance(p, Path) else Path.parse(p) for p in (paths or default_paths(learner))]
    if support_x.shape[1] != 3:
        candidates = [p for p in candidates if p.pre != "haze"]
    if not candidates:
        raise AdapterError("no adaptation path to choose from")
    try:
        for p in candidates:
            learner.hint(p.told)  # told:F needs a model that can be told F
    except ValueError as exc:
        raise AdapterError(str(exc)) from None
    validation_steps = steps if validation_steps is None else validation_steps
    folds, scheme = _folds(support_x, support_y, max_folds) if len(candidates) > 1 else ([], "forced")
    if score_side is not None:
        folds = [(fx, fy, center_crop(hx, score_side, score_side), center_crop(hy, score_side, score_side), fi, hi)
                 for fx, fy, hx, hy, fi, hi in folds]
    for _, _, _, _, fit_idx, held_idx in folds:
        if held_idx in fit_idx:  # a guard as well as documentation
            raise AssertionError("a validation fold scores a pair it fitted on")
    scores: dict[str, list[float]] = {p.name: [] for p in candidates}
    before: list[float] = []
    plain = [p for p in candidates if not p.adapted]
    fitted: list[Operators] = []
    held_pres: list[dict] = [{} for _ in folds]  # per fold: pre-stepped held-out images, reused in round two
    # Round one: the paths without gradient steps (forward passes only), fold by fold; then those that
    # refine another pre-step (hqs: deconv), only where that one helps (``_pre_helps``).
    for fit_x, fit_y, held_x, held_y, fit_idx, held_idx in folds:
        if on_fold is not None:
            on_fold(list(fit_idx), held_idx)
        fitted.append(Operators.fit(fit_y, fit_x, {p.operator for p in candidates if p.operator}))
        before.append(psnr(held_x, held_y))
    ruled_out = _ruled_out(candidates, fitted)
    plain = [p for p in plain if p.name not in ruled_out]
    first = [p for p in plain if p.pre not in REFINES]
    for n, (_, _, held_x, held_y, _, _) in enumerate(folds):
        for name, score in _plain_scores(learner, first, fitted[n], held_x, held_y, held_pres[n]).items():
            scores[name].append(score)
    repeats = _repeat_told(candidates, scores) if folds else []  # the best told path, more passes of it
    for n, (_, _, held_x, held_y, fit_idx, held_idx) in enumerate(folds if repeats else []):
        if on_fold is not None:
            on_fold(list(fit_idx), held_idx)
        for name, score in _plain_scores(learner, repeats, fitted[n], held_x, held_y, held_pres[n]).items():
            scores.setdefault(name, []).append(score)
    candidates += repeats
    plain += repeats
    refining = [p for p in plain if p.pre in REFINES and _pre_helps(REFINES[p.pre], first, scores)]
    skipped: list[str] = []
    if refining and budget_s is not None and time.perf_counter() - start > budget_s:
        skipped += [p.name for p in refining]  # the budget is spent: never chosen, listed as skipped
        refining = []
    for n, (_, _, held_x, held_y, fit_idx, held_idx) in enumerate(folds if refining else []):
        if on_fold is not None:
            on_fold(list(fit_idx), held_idx)
        for name, score in _plain_scores(learner, refining, fitted[n], held_x, held_y, held_pres[n]).items():
            scores[name].append(score)
    # Round two: the adapted paths, each only on a pre-step that helps by itself (``_pre_helps``),
    # best pre-step first, every candidate's folds in one batched adaptation, within the budget.
    adapted = [p for p in candidates if p.adapted and p.name not in ruled_out
               and _pre_helps(p.pre, plain, scores) and _told_helps(p, scores)] if folds else []
    polish = _polish_told(candidates, scores)  # the best told path, if it helps: FiLM on top of it too
    if polish is not None and folds:
        candidates.append(polish)
        scores[polish.name] = []
        adapted.append(polish)
    adapted.sort(key=lambda p: -_base_score(p, plain, scores))  # stable: ties keep the candidates' order
    if adapted and on_fold is not None:
        for _, _, _, _, fit_idx, held_idx in folds:
            on_fold(list(fit_idx), held_idx)
    windows = sum(int(f[0].shape[0]) for f in folds)  # fit pairs over the folds: one window each per step
    per_step = None  # seconds per gradient step over all folds' windows, measured
    for path in adapted:
        if budget_s is not None and per_step is None and time.perf_counter() - start < budget_s:
            # the first candidate: one timed step tells what it would cost
            probe = time.perf_counter()
            try:
                _validate_adapted(learner, path, folds, fitted, 1, patch, held_pres)
            except (ValueError, RuntimeError, torch.linalg.LinAlgError):
                pass  # its validation fails alike, below
            per_step = time.perf_counter() - probe
        begun = time.perf_counter()
        # this candidate's validation, then the final fit it would need (steps x every pair's window)
        needed = 0.0 if per_step is None else per_step * (validation_steps + steps * support_x.shape[0] / windows)
        if budget_s is not None and begun - start + needed > budget_s:
            skipped.append(path.name)
            continue
        try:
            scores[path.name] = _validate_adapted(learner, path, folds, fitted, validation_steps, patch, held_pres)
        except (ValueError, RuntimeError, torch.linalg.LinAlgError):
            scores[path.name] = [float("-inf")] * len(folds)
        per_step = (time.perf_counter() - begun) / max(1, validation_steps)
    mean = {name: (sum(v) / len(v) if v else float("nan")) for name, v in scores.items()}
    if scheme == "forced":
        chosen = candidates[0]
    elif not folds:
        chosen = Path()
    else:  # the best mean held-out PSNR; ties keep the earlier (simpler) candidate; never an unscored one
        chosen = max(candidates, key=lambda p: (mean[p.name] if scores[p.name] else float("-inf"),
                                                -candidates.index(p)))
    ops = Operators.fit(support_y, support_x, {chosen.operator} if chosen.operator else set())
    try:
        ops.prepare(chosen, learner)  # a synthetic path trains now, so that the adapter can be stored
    except ValueError as exc:
        raise AdapterError(str(exc)) from None
    params = None
    if chosen.adapted:
        params = _detach(learner.adapt(pre_step(chosen, ops, support_x, learner), support_y, steps=steps,
                                       kind=chosen.restorer, patch=patch, family=chosen.told))
    kernel_fit = ops.kernel
    if kernel_fit is None:
        from metarestore.operators.kernel import fit_kernel

        kernel_fit = fit_kernel(support_y, support_x)
    info = {
        "path": chosen.name, "shots": int(support_x.shape[0]), "validation": scheme, "folds": len(folds),
        "steps": steps if chosen.adapted else 0,
        "validation_steps": validation_steps if chosen.adapted and folds else 0,
        "psnr_before": _finite(sum(before) / len(before)) if before else None,
        "psnr_after": _finite(mean.get(chosen.name)) if folds else None,
        "psnr_zero_shot": _finite(mean.get("zero_shot")) if folds else None,
        "scores": {name: _finite(v) for name, v in mean.items()} if folds else {},
        "skipped": skipped, "ruled_out": sorted(ruled_out),
        "residuals": dict(ops.residuals), "kernel_residual": kernel_fit.residual,
        "noise": fit_noise(kernel_fit.apply(support_y.double()), support_x.double()).as_dict(),
    }
    info["fit_ms"] = round((time.perf_counter() - start) * 1000, 1)
    return Adapter(learner, chosen, ops, params, info)


def _ruled_out(candidates: list[Path], fitted: list[Operators]) -> set[str]:
    """Candidates that a closed-form check on every fold's operators rules out before any is scored: the
    kernel paths (deconv, hqs, wiener, rl and adapted paths on them) where every fold's kernel is the
    identity (``KernelFit.identity``: nothing to deconvolve, they could only smooth). Never chosen."""
    kernels = [ops.kernel for ops in fitted]
    if not kernels or any(k is None or not k.identity for k in kernels):
        return set()
    return {p.name for p in candidates if p.operator == "kernel"}


def _base_score(path: Path, plain: list[Path], scores: dict[str, list[float]]) -> float:
    """The best mean held-out PSNR of the plain paths with ``path``'s pre-step (zero-shot for none)."""
    best = _best_plain(path.pre, plain, scores, restorer="net")
    return float("-inf") if best is None else best


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)
