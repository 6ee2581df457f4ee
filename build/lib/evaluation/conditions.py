"""The evaluation grid: datasets, conditions, and the seeded degraded inputs every method shares.

- A *dataset* is a folder (or ``embedded``: scikit-image's held-out validation samples), its images
  centre-cropped to ``crop`` pixels (0 = full images) so CPU runs stay tractable; the first ``limit``
  images are evaluated, all of them serve as support images.
- A *condition* is a family at one level: a severity in [0, 1] (the family samples its parameters) or
  a protocol's fixed parameters (``sigma = 25/255``), plus how that protocol measures (clipping,
  8-bit output, Y channel, border shave, modcrop).
- Determinism: every random choice for one (dataset, image, family, level) comes from
  ``stable_seed(seed, dataset, image, family, level)`` (SHA-256, not Python's per-process salted
  ``hash``), so every method sees exactly the same degraded input, on any worker, in every rerun.
- Support pairs for adaptation: ``shots`` random patches of the *other* images of the same dataset
  (never the query image), degraded with the query's task parameters and fresh noise (the one rule of
  ``metarestore.fewshot``). The first K of them form the K-shot set, so shot settings are nested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from metarestore import degradations, pixels
from metarestore.data import EMBEDDED, DataError, load_images
from metarestore.degradations.base import cpu_generator, draw_seed, stable_seed
from metarestore.fewshot import Task


@dataclass
class Dataset:
    name: str
    source: str
    images: list[torch.Tensor]  # uint8 (3, H, W), centre-cropped
    names: list[str]
    queries: list[int]  # indices of the evaluated images (the first `limit`)
    crop: int  # 0 = full images


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` window (a side shorter than ``size`` is kept whole);
    top = (H - size) // 2, left = (W - size) // 2."""
    return image if size <= 0 else pixels.center_crop(image, size, size)


def dataset_name(spec: str) -> str:
    return EMBEDDED if spec == EMBEDDED else Path(spec).expanduser().resolve().name


def load_dataset(spec: str, crop: int = 0, limit: int | None = None, name: str | None = None) -> Dataset:
    """``embedded`` (the validation samples) or a folder of images; DataError if missing or empty."""
    images = load_images(spec, "val") if spec == EMBEDDED else load_images(spec)
    cropped = [center_crop(im, crop).contiguous() for im in images.images]
    count = len(cropped) if limit is None else max(1, min(limit, len(cropped)))
    return Dataset(name or dataset_name(spec), images.source, cropped, list(images.names), list(range(count)), crop)


@dataclass
class Condition:
    family: str
    level: str  # what tables show: "0.5" (a severity) or a protocol level such as "sigma=25"
    severity: float | None = None  # sample the family's parameters at this severity ...
    fixed: dict[str, float] | None = field(default=None)  # ... or use these (plus a seeded "seed")
    quantize: bool = False  # score 8-bit outputs (round to 1/255), as published tables do
    y_channel: bool = False  # score the BT.601 luma only
    shave: int = 0  # ignore this many border pixels when scoring
    modcrop: int = 1  # crop images to a multiple of this (super-resolution)


def grid_conditions(families: list[str], severities: list[float]) -> list[Condition]:
    degradations.validate(families)
    return [Condition(family, f"{s:g}", severity=float(s)) for family in families for s in severities]


def task_params(cond: Condition, dataset: str, image: str, seed: int) -> dict:
    """The degradation parameters of (dataset, image, family, level): the task the query image and its
    support pairs share."""
    generator = cpu_generator(stable_seed(seed, dataset, image, cond.family, cond.level))
    if cond.fixed is not None:
        return {**cond.fixed, "seed": draw_seed(generator)}
    return degradations.get(cond.family).sample(float(cond.severity), generator)


def modcrop(x: torch.Tensor, multiple: int) -> torch.Tensor:
    if multiple <= 1:
        return x
    h, w = x.shape[-2:]
    return x[..., :h - h % multiple, :w - w % multiple]


def clean_image(dataset: Dataset, index: int, cond: Condition) -> torch.Tensor:
    """The reference image as a float (1, 3, H, W) batch in [0, 1]."""
    return modcrop(dataset.images[index][None].float() / 255.0, cond.modcrop)


def task(cond: Condition, params: dict) -> Task:
    return Task(cond.family, params)


def degrade(cond: Condition, clean: torch.Tensor, params: dict) -> torch.Tensor:
    """The query image under the condition's task (what every method sees)."""
    return task(cond, params).degrade(clean)


def support_set(dataset: Dataset, index: int, cond: Condition, params: dict, shots: int, size: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``shots`` (degraded, clean) patch pairs from the dataset's other images, for ``learner.adapt``."""
    others = [i for i in range(len(dataset.images)) if i != index]
    if not others:
        raise DataError(f"{dataset.name}: adaptation needs at least 2 images (support pairs come from the "
                        "other images of the dataset)")
    side = min([size] + [min(dataset.images[i].shape[-2:]) for i in others])
    side -= side % cond.modcrop
    generator = cpu_generator(stable_seed(seed, dataset.name, dataset.names[index], cond.family, cond.level,
                                          "support"))
    patches = []
    for _ in range(shots):
        image = dataset.images[others[int(torch.randint(len(others), (), generator=generator))]]
        h, w = image.shape[-2:]
        top = int(torch.randint(h - side + 1, (), generator=generator))
        left = int(torch.randint(w - side + 1, (), generator=generator))
        patches.append(image[:, top:top + side, left:left + side])
    support_y = torch.stack(patches).float() / 255.0
    return task(cond, params).degrade_support(support_y), support_y
