"""Experiment configuration: one YAML file describes one experiment (BasicSR style).

Dataclasses give defaults and types; unknown keys and bad values fail early with one clear line.
``--set a.b=value`` overrides use YAML syntax for the value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metarestore.errors import UserError
from metarestore.param_groups import INNER_LR_GROUPS

OPTIMIZERS = ("adamw", "sgd")


class ConfigError(UserError, ValueError):
    """A user mistake in a config file or override."""


@dataclass
class DataConfig:
    train: str = "embedded"  # "embedded" (scikit-image samples) or a folder of images
    val: str = "embedded"  # held-out images: "embedded" uses the embedded validation split
    patch_size: int = 64
    support: int = 4  # K support pairs per task
    query: int = 4  # Q query pairs per task


@dataclass
class FamiliesConfig:
    train: list[str] = field(default_factory=lambda: [
        "gaussian_noise", "poisson_noise", "salt_pepper", "gaussian_blur", "jpeg", "downsample",
        "low_light", "contrast", "inpainting"])
    held_out: list[str] = field(default_factory=lambda: ["motion_blur", "haze", "color_cast"])
    weights: dict[str, float] = field(default_factory=dict)  # per family; missing -> 1.0
    severity: list[float] = field(default_factory=lambda: [0.2, 1.0])  # sampled uniformly in range

    def weight(self, family: str) -> float:
        return float(self.weights.get(family, 1.0))


@dataclass
class ModelConfig:
    width: int = 16
    enc_blocks: list[int] = field(default_factory=lambda: [1, 1, 2])
    middle_blocks: int = 2
    dec_blocks: list[int] = field(default_factory=lambda: [1, 1, 1])
    adapt: str = "film"  # the adapter kind the inner loop adapts (metarestore.model.kinds.KINDS)
    # none | degradation: a degradation encoder whose embedding scales and shifts every block's output
    # (metarestore.model.condition); starts as a no-op, so it loads an unconditioned checkpoint
    condition: str = "none"
    # condition: family: the families a caller may name, in table order (default: families.train)
    hint_families: list[str] = field(default_factory=list)


@dataclass
class MetaConfig:
    algorithm: str = "fomaml"
    inner_steps: int = 1
    # inner-loop learning rate per parameter group (intro, encoder, middle, decoder, ending, film);
    # "default" applies to any group not named.
    inner_lr: dict[str, float] = field(default_factory=lambda: {"default": 0.01})
    tasks_per_family: int = 1  # every step holds this many tasks of every training family
    loss: str = "l1"
    # maml/fomaml/metasgd: weight of the query loss *before* adaptation in each task's objective, so the
    # meta-learned initialisation also restores well on its own (a request without an adapter)
    zero_shot_weight: float = 1.0
    # model.condition: family: the fraction of tasks trained blind (no hint), drawn per task from its seed
    blind_fraction: float = 0.25
    # metasgd: what it learns, one inner rate per parameter group (group) or one per adapted number and inner
    # step (parameter); first_order: the rates learn through the update with the inner gradient held constant
    rates: str = "group"
    first_order: bool = False


@dataclass
class TrainConfig:
    steps: int = 300
    optimizer: str = "adamw"  # adamw | sgd
    outer_lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (to outer_lr * min_lr_ratio at the last step)
    min_lr_ratio: float = 0.01
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # > 0: the run validates, checkpoints and ships an exponential moving average of its weights with this
    # decay (metarestore.ema; BasicSR's ema_decay, 0.999 typical); the live weights travel in the training state
    ema_decay: float = 0.0
    log_every: int = 10
    val_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    device: str = "auto"  # auto | cpu | cuda
    init: str | None = None  # a model URI (builtin:base, models:/..., a folder) to fine-tune from
    # parameter-name prefixes the run trains, the rest frozen (empty: all): ``[condition.]`` teaches a told
    # model new rows (families or chains) and leaves every other row and the network bit for bit as they were
    trainable: list[str] = field(default_factory=list)
    # patches (support + query) that go through the network together; a step's tasks run in chunks of
    # this size: past it the activations leave the CPU's caches and each patch costs twice as much
    max_batch_patches: int = 72
    # fp32 | bf16 | auto: bf16 autocast of the meta-step (the image-facing convolutions stay float32); auto =
    # bf16 on a CPU with bf16 units (AVX-512 BF16 or AMX), fp32 elsewhere and on CUDA. Equal PSNR at equal
    # steps in A/Bs from scratch and from the base run's step 15800 (docs/benchmarks.md)
    precision: str = "auto"
    output_dir: str = "runs/{name}"


@dataclass
class ValConfig:
    images: int = 4  # held-out query images per family
    shots: int = 4
    steps: int = 5
    severity: float = 0.5
    patch_size: int = 96


@dataclass
class TrackingConfig:
    uri: str | None = None  # None -> MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "metarestore"
    registered_model: str = "metarestore"
    register: bool = True


@dataclass
class DistributedConfig:
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    family_costs: dict[str, float] = field(default_factory=dict)  # seconds per task; empty -> measured at start
    storage_path: str | None = None  # Ray Train checkpoints; None -> <output_dir>/ray (shared storage on a cluster)


@dataclass
class Config:
    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    families: FamiliesConfig = field(default_factory=FamiliesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    search: dict[str, Any] = field(default_factory=dict)  # Ray Tune search space, see configs/tune-*.yaml

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir.format(name=self.name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        from metarestore import degradations
        from metarestore.meta.learner import ALGORITHMS  # the registries are the one source of names
        from metarestore.meta.losses import LOSSES
        from metarestore.model.condition import CONDITIONS
        from metarestore.model.kinds import KINDS

        problems = []
        if self.meta.algorithm not in ALGORITHMS:
            problems.append(f"meta.algorithm must be one of {', '.join(ALGORITHMS)}")
        if self.model.adapt not in KINDS:
            problems.append(f"model.adapt must be one of {', '.join(KINDS)}")
        if self.model.condition not in CONDITIONS:
            problems.append(f"model.condition must be one of {', '.join(CONDITIONS)}")
        if self.model.condition == "family" and not self.model.hint_families:
            self.model.hint_families = list(self.families.train)
        if not 0 <= self.meta.blind_fraction <= 1:
            problems.append("meta.blind_fraction must be in [0, 1]")
        if self.train.lr_schedule not in ("constant", "cosine"):
            problems.append("train.lr_schedule must be constant or cosine")
        if not 0 <= self.train.ema_decay < 1:
            problems.append("train.ema_decay must be in [0, 1) (0: no weight average)")
        if self.train.precision not in ("auto", "fp32", "bf16"):
            problems.append("train.precision must be auto, fp32 or bf16")
        if self.train.optimizer not in OPTIMIZERS:
            problems.append(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.meta.loss not in LOSSES:
            problems.append(f"meta.loss must be one of {', '.join(LOSSES)}")
        if not self.families.train:
            problems.append("families.train is empty")
        for name in [*self.families.train, *self.families.held_out, *self.families.weights]:
            try:
                degradations.get(name)
            except degradations.UnknownFamilyError as exc:
                problems.append(f"families: {exc}")
        overlap = set(self.families.train) & set(self.families.held_out)
        if overlap:
            problems.append(f"families both trained and held out: {', '.join(sorted(overlap))}")
        if any(w < 0 for w in self.families.weights.values()):
            problems.append("families.weights must be >= 0")
        if sum(self.families.weight(f) for f in self.families.train) <= 0:
            problems.append("families.weights: at least one training family needs a positive weight")
        lo, hi = (self.families.severity + [None, None])[:2]
        if len(self.families.severity) != 2 or not 0 <= lo <= hi <= 1:
            problems.append("families.severity must be [low, high] with 0 <= low <= high <= 1")
        if len(self.model.enc_blocks) != len(self.model.dec_blocks):
            problems.append("model.enc_blocks and model.dec_blocks need the same length")
        for key, value in {"data.patch_size": self.data.patch_size, "data.support": self.data.support,
                           "data.query": self.data.query, "model.width": self.model.width,
                           "train.steps": self.train.steps, "train.max_batch_patches": self.train.max_batch_patches,
                           "meta.tasks_per_family": self.meta.tasks_per_family,
                           "distributed.workers": self.distributed.workers}.items():
            if value < 1:
                problems.append(f"{key} must be >= 1")
        if self.meta.zero_shot_weight < 0:
            problems.append("meta.zero_shot_weight must be >= 0")
        if self.meta.inner_steps < 0:
            problems.append("meta.inner_steps must be >= 0")
        unknown_groups = set(self.meta.inner_lr) - set(INNER_LR_GROUPS)
        if unknown_groups:
            problems.append(f"meta.inner_lr: unknown group(s) {', '.join(sorted(unknown_groups))}; "
                            f"known: {', '.join(INNER_LR_GROUPS)}")
        if any(v <= 0 for v in self.meta.inner_lr.values()):
            problems.append("meta.inner_lr values must be > 0")
        if self.meta.rates not in ("group", "parameter"):
            problems.append(f"meta.rates must be group or parameter, not {self.meta.rates!r}")
        elif self.meta.rates == "parameter" and self.meta.algorithm != "metasgd":
            problems.append("meta.rates: parameter is Meta-SGD's (meta.algorithm: metasgd)")
        if self.meta.first_order and self.meta.algorithm != "metasgd":
            problems.append("meta.first_order is Meta-SGD's option (first-order MAML is meta.algorithm: fomaml)")
        multiple = 2 ** len(self.model.enc_blocks)
        if self.data.patch_size % multiple:
            problems.append(f"data.patch_size must be a multiple of {multiple} (2 ** number of stages)")
        if problems:
            raise ConfigError("; ".join(problems))
        return self


def _build(cls: type, data: Any, path: str) -> Any:
    """Build a dataclass from a mapping, rejecting unknown keys and coercing simple types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            where = f"{path}." if path else ""
            raise ConfigError(f"unknown config key {where}{key!r}; known: {', '.join(known)}")
        kwargs[key] = _coerce(hints[key], value, f"{path}.{key}" if path else key)
        default = known[key].default_factory
        if isinstance(kwargs[key], dict) and default is not dataclasses.MISSING and not dataclasses.is_dataclass(
                hints[key]):
            kwargs[key] = {**default(), **kwargs[key]}  # a mapping refines its default (inner_lr keeps "default")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _coerce(hint, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if hint is int and float(value) != int(value):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, creating sections as needed."""
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        set_path(data, key, value)
    return data


# keys a config no longer has: a checkpoint saved with one left empty still loads; set, it is an error
RETIRED = {("families", "unclipped"): "train the awgn family (Gaussian noise left unclipped) instead"}


def from_dict(data: dict[str, Any]) -> Config:
    data = dict(data)
    for (section, key), instead in RETIRED.items():
        if isinstance(data.get(section), dict) and key in data[section]:
            if data[section][key]:
                raise ConfigError(f"{section}.{key} is retired: {instead}")
            data[section] = {k: v for k, v in data[section].items() if k != key}
    return _build(Config, data, "").validate()


def read_yaml(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw mapping of a YAML config file with ``--set`` overrides applied."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    return apply_overrides(data, overrides or [])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data = read_yaml(path, overrides) if path is not None else apply_overrides({}, overrides or [])
    return from_dict(data)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values (MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def dump(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
