"""Every method on one (image, condition): the unit of work a Ray task runs.

The degraded input is made once per unit and handed to every method, so all rows of a unit share it:

- ``identity``: the degraded input itself (for ``downsample``: the bicubic image);
- classical baselines of the family (``evaluation.baselines``);
- each network (``ModelSpec``): zero-shot (shots 0, steps 0), then for every shots K > 0 and steps S,
  ``learner.adapt(support_x[:K], support_y[:K], steps=S)`` (the one shared ``adapt()``, first order,
  the model untouched) and a restoration with the adapted parameters. ``steps=0`` with K > 0 goes
  through the same path and equals zero-shot, a built-in check. The networks are the model under test
  (``model``), the ``specialist`` (a multi-task model fine-tuned with the same shots and steps; it has
  no zero-shot rows of its own) and an optional second model labelled by its name.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from evaluation import baselines as classical
from evaluation.conditions import Condition, Dataset, clean_image, degrade, support_set, task_params
from evaluation.metrics import score
from metarestore.fewshot import few_shot
from metarestore.inference import restore_as_asked
from metarestore.meta import MetaLearner
from metarestore.pixels import to_uint8


@dataclass
class Settings:
    """What every unit does, the same for the whole evaluation."""

    shots: list[int]
    steps: list[int]
    baselines: list[str] | None  # None: every baseline of the family
    support_size: int = 96
    seed: int = 0
    protocol: str = ""
    lpips: bool = False
    tile: int | None = 512
    threads: int = 1
    use_gpu: bool = False
    told: bool = False  # name each condition's family to a model that can be told it (model.condition: family)
    adapter: str = "own"  # own: learner.adapt (the learner's own kind, FiLM or LoRA); auto: fit_as_served
    ensemble: bool = False  # restore with the x8 self-ensemble (inference.self_ensemble): rows "model x8"


@dataclass
class ModelSpec:
    label: str  # the `method` column: "model", "specialist" or the second model's name
    display: str  # the `model` column: NAME/VERSION or the checkpoint path
    key: str  # identifies the weights (cache key in workers)
    payload: Any  # (metadata, state_dict), or a Ray ObjectRef of it
    zero_shot: bool = True


@dataclass
class Unit:
    dataset: str
    index: int
    condition: Condition
    example: bool = False  # keep the images for the report's example grids


def adapted_label(label: str, shots: int, steps: int) -> str:
    return label if shots == 0 else f"{label} {shots}-shot {steps}-step"


def auto_adapted(learner: MetaLearner, x: torch.Tensor, support_x: torch.Tensor, support_y: torch.Tensor,
                 steps: int) -> torch.Tensor:
    """What a client of ``POST /v1/adapters`` (path auto) gets from a server with default settings: the same
    fit (``fit_as_served``: the path chosen by leave-one-out among zero-shot, FiLM/LoRA and the operator +
    restorer paths) with ``steps`` steps (0: only the paths without gradient steps), then the image restored
    with it (whole: an adapter's pre-step sees the whole image, as a server's does)."""
    from metarestore.inference import fit_as_served

    return fit_as_served(learner, support_x, support_y, steps=steps).restore(x)


def run_unit(unit: Unit, dataset: Dataset, models: list[tuple[ModelSpec, MetaLearner]], settings: Settings,
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """Rows (one per method, shots and steps) for one image under one condition, and example images."""
    cond = unit.condition
    image = dataset.names[unit.index]
    params = task_params(cond, dataset.name, image, settings.seed)
    clean = clean_image(dataset, unit.index, cond).to(device)
    degraded = degrade(cond, clean, params)
    common = {"dataset": dataset.name, "image": image, "family": cond.family, "severity": cond.level,
              "params": json.dumps(params, sort_keys=True), "crop": dataset.crop, "height": clean.shape[-2],
              "width": clean.shape[-1], "protocol": settings.protocol}
    rows: list[dict[str, Any]] = []
    shown: dict[str, torch.Tensor] = {}

    def record(method: str, output: torch.Tensor, seconds: float, model: str = "", shots: int = 0,
               steps: int = 0, show: str | None = None) -> None:
        rows.append({**common, "method": method, "model": model, "shots": shots, "steps": steps,
                     **score(output, clean, cond, settings.lpips), "seconds": round(seconds, 4)})
        if unit.example and show is not None:
            shown[show] = to_uint8(output[0])

    record("identity", degraded, 0.0, show="degraded")
    for name in classical.for_family(cond.family, settings.baselines):
        t0 = time.perf_counter()
        output = classical.run(name, cond.family, degraded, params)
        record(name, output, time.perf_counter() - t0, show=name)

    positive = sorted({k for k in settings.shots if k > 0})
    support = None
    if positive and models:
        support = support_set(dataset, unit.index, cond, params, max(positive), settings.support_size,
                              settings.seed)
        support = (support[0].to(device), support[1].to(device))
    last_k, last_s = (max(positive), max(settings.steps)) if positive else (0, 0)

    def tiled(learner: MetaLearner, x: torch.Tensor, params, family: str | None = None) -> torch.Tensor:
        return restore_as_asked(learner, x, params, family, tile=settings.tile, ensemble=settings.ensemble)

    for spec, learner in models:
        told = settings.told and cond.family in learner.hint_families
        family, label = (cond.family, f"{spec.label} (told)") if told else (None, spec.label)
        label += " x8" if settings.ensemble else ""
        if spec.zero_shot:
            t0 = time.perf_counter()
            output = few_shot(learner, degraded, restore=tiled, family=family).zero_shot
            record(label, output, time.perf_counter() - t0, spec.display, show=label)
        for k in positive:
            for s in settings.steps:
                t0 = time.perf_counter()
                if settings.adapter == "auto":
                    output = auto_adapted(learner, degraded, support[0][:k], support[1][:k], s)
                else:
                    output = few_shot(learner, degraded, (support[0][:k], support[1][:k]), steps=s, zero_shot=False,
                                      restore=tiled, family=family).adapted
                show = adapted_label(label, k, s) if (k, s) == (last_k, last_s) else None
                record(label, output, time.perf_counter() - t0, spec.display, k, s, show)
    example = None
    if unit.example:
        example = {"dataset": dataset.name, "image": image, "family": cond.family, "level": cond.level,
                   "columns": [*shown, "clean"], "images": [*shown.values(), to_uint8(clean[0])]}
    return {"rows": rows, "example": example}
