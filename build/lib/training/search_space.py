"""The search space of ``metarestore tune``, read from the ``search:`` section of a config.

Any config key can be searched by its dotted path; ``task_weights`` is a shorthand for one weight per
training family. Task weights are searched **log-uniformly, one per family**: the outer loss divides by
the sum of the weights, so only their ratios matter and the search is effectively over the simplex,
without the awkward constraint. Example::

    search:
      metric: val/psnr_adapted      # maximised by default (mode: max)
      algorithm: optuna             # optuna (TPE, default) | random | grid
      num_samples: 4
      max_concurrent: 2
      scheduler: {type: asha, grace_period: 20, reduction_factor: 2}   # grace period in steps; or type: none
      include_default: false        # true: the first trial is the base config itself (a fair baseline)
      space:
        task_weights: {loguniform: [0.25, 4.0]}
        meta.inner_lr.default: {loguniform: [0.003, 0.1]}
        meta.inner_steps: {choice: [1, 2]}
        train.outer_lr: {loguniform: [0.0005, 0.005]}

Distributions: ``uniform: [lo, hi]``, ``loguniform: [lo, hi]``, ``quniform: [lo, hi, q]``,
``randint: [lo, hi]`` (hi exclusive), ``choice: [a, b, ...]``, ``grid: [a, b, ...]``.
A bad space (unknown key, empty or inverted range, a family that does not exist) fails before any
trial starts, with one line.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from metarestore.config import ConfigError, from_dict, set_path

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")
ALGORITHMS = ("optuna", "random", "grid")


@dataclass
class SearchSpec:
    space: dict[str, tuple[str, list]]  # dotted key -> (distribution, arguments)
    metric: str = "val/psnr_adapted"
    mode: str = "max"
    algorithm: str = "optuna"
    num_samples: int = 4
    max_concurrent: int = 2
    seed: int = 0
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    include_default: bool = False  # the first trial runs the base config's own values, for comparison


def _parse_distribution(key: str, spec: Any) -> tuple[str, list]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"search.space.{key}: expected one distribution such as {{loguniform: [0.1, 1]}}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"search.space.{key}: unknown distribution {kind!r}; known: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"search.space.{key}: {kind} needs a non-empty list")
    if kind in ("choice", "grid"):
        return kind, args
    need = 3 if kind == "quniform" else 2
    if len(args) != need or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"search.space.{key}: {kind} needs {need} numbers")
    low, high = args[0], args[1]
    if not low < high:
        raise ConfigError(f"search.space.{key}: empty or inverted range [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"search.space.{key}: loguniform needs a positive range")
    return kind, list(args)


def parse_search(base: dict[str, Any]) -> SearchSpec:
    """Read and check ``base["search"]`` against the rest of the config (base is the raw config dict)."""
    raw = dict(base.get("search") or {})
    if not raw.get("space"):
        raise ConfigError("the config has no search.space to search over")
    known = {"space", "metric", "mode", "algorithm", "num_samples", "max_concurrent", "seed", "scheduler",
             "include_default"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown key search.{sorted(unknown)[0]}; known: {', '.join(sorted(known))}")
    families = from_dict({k: v for k, v in base.items() if k != "search"}).families.train
    space: dict[str, tuple[str, list]] = {}
    for key, spec in raw["space"].items():
        if key == "task_weights":
            for family in families:
                space[f"families.weights.{family}"] = _parse_distribution(key, spec)
        else:
            space[key] = _parse_distribution(key, spec)
    spec = SearchSpec(space=space, **{k: v for k, v in raw.items() if k != "space"})
    if spec.mode not in ("max", "min"):
        raise ConfigError("search.mode must be max or min")
    if spec.algorithm not in ALGORITHMS:
        raise ConfigError(f"search.algorithm must be one of {', '.join(ALGORITHMS)}")
    kinds = {kind for kind, _ in space.values()}
    if spec.algorithm == "grid" and kinds - {"grid", "choice"}:
        raise ConfigError("search.algorithm grid needs grid (or choice) distributions only")
    if spec.algorithm != "grid" and "grid" in kinds:
        raise ConfigError("grid distributions need search.algorithm: grid")
    if spec.scheduler.get("type", "asha") not in ("asha", "none"):
        raise ConfigError("search.scheduler.type must be asha or none")
    for extreme in _extremes(space):
        trial_config(base, extreme)  # every bound must make a valid config: catches keys, families, values
    return spec


def _extremes(space: dict[str, tuple[str, list]]) -> list[dict[str, Any]]:
    """Assignments that together visit every bound and every choice of every searched key."""
    picks = {}
    for key, (kind, args) in space.items():
        if kind in ("choice", "grid"):
            picks[key] = args
        elif kind == "randint":
            picks[key] = [args[0], args[1] - 1]
        else:
            picks[key] = [args[0], args[1]]
    width = max(len(v) for v in picks.values())
    return [{k: v[i % len(v)] for k, v in picks.items()} for i in range(width)]


def default_point(base: dict[str, Any], spec: SearchSpec) -> dict[str, Any]:
    """The base config's own value of every searched key (a missing task weight is 1.0)."""
    from metarestore.config import flatten

    cfg = trial_config(base, {})
    flat = flatten(cfg.to_dict())
    point = {}
    for key in spec.space:
        if key.startswith("families.weights."):
            point[key] = cfg.families.weight(key.rsplit(".", 1)[1])
        elif key.startswith("meta.inner_lr."):
            from metarestore.meta.adapt import group_lr

            point[key] = float(group_lr(key.rsplit(".", 1)[1], cfg.meta.inner_lr))
        elif key in flat:
            point[key] = flat[key]
        else:
            raise ConfigError(f"search.include_default: the base config has no value for {key}")
    return point


def trial_config(base: dict[str, Any], values: dict[str, Any]):
    """The experiment a trial runs: the base config with the sampled values, without the search section."""
    data = copy.deepcopy({k: v for k, v in base.items() if k != "search"})
    for key, value in values.items():
        set_path(data, key, value)
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"search space: {exc}") from None


def tune_space(spec: SearchSpec) -> dict[str, Any]:
    """Ray Tune distributions, keyed by the dotted config path."""
    from ray import tune

    make = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "quniform": lambda a: tune.quniform(*a), "randint": lambda a: tune.randint(*a),
            "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[kind](args) for key, (kind, args) in spec.space.items()}
