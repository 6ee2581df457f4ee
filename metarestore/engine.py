"""The meta-training engine: one meta-step, validation, and checkpoint state. No Ray here.

``MetaTrainer.run_step`` takes the step's tasks and an optional ``reduce`` (a sum over workers), so the
single-process trainer and every Ray worker run exactly the same code: a worker passes its shard of
the tasks and an all-reduce; one process passes all tasks and nothing. The weight normaliser is the
sum over *all* tasks of the step, so the summed update equals the single-process one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from metarestore.checkpoint import Checkpoint, optimizer_from_tensors, optimizer_to_tensors
from metarestore.config import Config, from_dict
from metarestore.data import EMBEDDED, EpisodeSampler, PatchSampler, TaskSpec, load_images
from metarestore.degradations.base import cpu_generator, stable_seed
from metarestore.ema import WeightEMA
from metarestore.errors import ResumeError, UserError
from metarestore.fewshot import Task, few_shot
from metarestore.meta import MetaLearner, build_learner, flat_grad, set_flat_grad
from metarestore.meta.learner import OWN, split_weights
from metarestore.model import count_parameters
from metarestore.model.network import load_weights

Reduce = Callable[[torch.Tensor], torch.Tensor]
LIVE = "live."  # the live weights' prefix in the training state of a run that keeps a weight average


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is available")
    return torch.device(name)


def cpu_has_bf16_units() -> bool:
    """AVX-512 BF16 or AMX: where oneDNN runs bf16 convolutions natively. Elsewhere bf16 is emulated and a
    training step many times slower (docs/benchmarks.md)."""
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # a torch without these probes: assume not
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``train.precision``: ``auto`` is bf16 on a CPU with bf16 units (the meta-step 1.1-1.3x faster at equal
    PSNR: docs/benchmarks.md), fp32 elsewhere, CUDA included (no A/B has run on a GPU)."""
    if name != "auto":
        return name
    return "bf16" if device.type == "cpu" and cpu_has_bf16_units() else "fp32"


def plan_step(cfg: Config, step: int) -> list[TaskSpec]:
    """The tasks of one meta-step: ``tasks_per_family`` tasks of every training family.

    A pure function of (seed, step): every worker knows the whole step without communicating, and
    resuming at step N replays exactly the tasks a run that never stopped would have seen.
    """
    generator = cpu_generator(cfg.seed * 1_000_003 + step)
    low, high = cfg.families.severity
    tasks = []
    for family in cfg.families.train:
        for _ in range(cfg.meta.tasks_per_family):
            severity = low + (high - low) * float(torch.rand((), generator=generator))
            seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
            tasks.append(TaskSpec(family, round(severity, 6), seed))
    return tasks


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.outer_lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.outer_lr, weight_decay=t.weight_decay)


def outer_lr_at(cfg: Config, step: int) -> float:
    """The outer learning rate of a step: a pure function of the step, so resuming needs no scheduler state."""
    t = cfg.train
    if t.lr_schedule == "cosine":
        progress = min(1.0, step / max(1, t.steps - 1))
        floor = t.outer_lr * t.min_lr_ratio
        return floor + (t.outer_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return t.outer_lr


def validation_images(cfg: Config):
    return load_images(cfg.data.val, "val" if cfg.data.val == EMBEDDED else "all")


@dataclass
class ValidationResult:
    metrics: dict[str, float]
    examples: list[tuple[str, list[torch.Tensor]]]  # family -> [degraded, zero-shot, adapted, clean]


def initial_weights(cfg: Config) -> dict[str, torch.Tensor] | None:
    """``train.init``: the weights to fine-tune from. The network's shape comes from that model, so
    ``cfg.model`` is set to its model section (a fine-tune cannot change the architecture), except that
    ``model.condition`` may add a conditioning (it starts as a no-op), ``model.hint_families`` may add
    told rows after the saved model's (each starts as its blind row: ``load_weights``), and ``model.adapt``
    is the config's: the adapter kind picks which existing parameters (or parameter-free deltas, LoRA) the
    inner loop adapts, not the network's shape."""
    if not cfg.train.init:
        return None
    from metarestore.checkpoint import load_checkpoint
    from metarestore.hub import resolve

    ckpt = load_checkpoint(resolve(cfg.train.init, cfg.tracking.uri).path)
    saved = from_dict(ckpt.metadata["config"]).model
    if cfg.model.condition != "none" and saved.condition == "none":  # a conditioning added; a saved one stays
        saved.condition, saved.hint_families = cfg.model.condition, cfg.model.hint_families
    told = list(saved.hint_families)
    if saved.condition == cfg.model.condition == "family" and cfg.model.hint_families[:len(told)] == told:
        saved.hint_families = list(cfg.model.hint_families)  # the saved rows, then new ones
    saved.adapt = cfg.model.adapt
    cfg.model = saved
    return split_weights(ckpt.model)[0]  # the network: the learner's own tensors are its algorithm's


def trainable_parameters(learner: MetaLearner, prefixes: list[str]) -> list[torch.nn.Parameter]:
    """The parameters a run trains (``train.trainable``: name prefixes, the network's own without ``model.``;
    empty: all of them). The others stop needing gradients, so the backward pass skips their weight
    gradients, and the optimizer never holds them."""
    named = [(n.removeprefix("model."), p) for n, p in learner.named_parameters()]
    if not prefixes:
        return [p for _, p in named]
    unknown = [f for f in prefixes if not any(n.startswith(f) for n, _ in named)]
    if unknown:
        raise UserError(f"train.trainable: no parameter starts with {unknown[0]!r} (e.g. {named[0][0]!r})")
    for n, p in named:
        p.requires_grad_(any(n.startswith(f) for f in prefixes))
    return [p for _, p in named if p.requires_grad]


class MetaTrainer:
    """Model, learner, optimizer and episode sampler for one meta-training run."""

    def __init__(self, cfg: Config, device: torch.device | str | None = None):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        init = initial_weights(cfg)
        self.learner = build_learner(cfg, self.device, seed=cfg.seed)  # identical initial weights in every worker
        if init is not None:
            load_weights(self.learner.model, {k: v.to(self.device) for k, v in init.items()})
        self.model = self.learner.model
        self.params = trainable_parameters(self.learner, cfg.train.trainable)
        self.optimizer = build_optimizer(self.params, cfg)
        self.ema = WeightEMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.sampler = EpisodeSampler(load_images(cfg.data.train, "train"), cfg.data.patch_size,
                                      cfg.data.support, cfg.data.query)
        self.step = 0  # the next step to run
        self.families = list(cfg.families.train)

    # one meta-step ---------------------------------------------------------------------------------
    def run_step(self, tasks: list[TaskSpec] | None = None, reduce: Reduce | None = None) -> dict[str, float]:
        """Run meta-step ``self.step`` on ``tasks`` (default: all of the step's tasks)."""
        cfg = self.cfg
        planned = plan_step(cfg, self.step)
        tasks = planned if tasks is None else tasks
        total_weight = sum(cfg.families.weight(t.family) for t in planned)
        index = {f: i for i, f in enumerate(self.families)}
        stats = torch.zeros(3 * len(self.families) + 1, dtype=torch.float64)  # weighted, loss, count, n
        self.optimizer.zero_grad(set_to_none=True)
        self.learner.train()
        weights = torch.tensor([cfg.families.weight(t.family) for t in tasks], dtype=torch.float64)
        scales = weights / total_weight
        per_chunk = max(1, cfg.train.max_batch_patches // (cfg.data.support + cfg.data.query))
        losses = torch.zeros(len(tasks), dtype=torch.float64)
        for start in range(0, len(tasks), per_chunk):  # gradients accumulate over chunks
            chunk = slice(start, start + per_chunk)
            with self.autocast():
                found = self.learner.batch_gradient(self.sampler.batch(tasks[chunk], self.device),
                                                    scales[chunk].to(self.device, torch.float32))
            losses[chunk] = found.double().cpu()
        for task, scale, loss in zip(tasks, scales, losses, strict=True):
            i = index[task.family]
            stats[i] += scale * loss
            stats[len(self.families) + i] += loss
            stats[2 * len(self.families) + i] += 1
        stats[-1] = len(tasks)
        flat = torch.cat([flat_grad(self.params), stats.to(self.device, torch.float32)])
        if reduce is not None:
            flat = reduce(flat)
        n = flat.numel() - stats.numel()
        set_flat_grad(self.params, flat[:n])
        stats = flat[n:].double().cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.train.grad_clip) if cfg.train.grad_clip > 0 \
            else torch.linalg.vector_norm(flat[:n])
        lr = outer_lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        f = len(self.families)
        metrics = {"meta_loss": float(stats[:f].sum()), "grad_norm": float(grad_norm), "tasks": float(stats[-1]),
                   "outer_lr": lr}
        for family, i in index.items():
            if stats[2 * f + i] > 0:
                metrics[f"loss/{family}"] = float(stats[f + i] / stats[2 * f + i])
        if self.learner.learns_inner_lrs:
            metrics.update({f"inner_lr/{g}": v for g, v in self.learner.inner_lr_values().items()})
        return metrics

    def autocast(self) -> torch.autocast:
        """bf16 autocast of the meta-step's forward and backward passes where ``train.precision`` resolves to
        bf16 (convolutions and matrix products in bf16; the loss, the weights and the optimizer stay float32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # validation ------------------------------------------------------------------------------------
    def validate(self) -> ValidationResult:
        with self.averaged():
            return validate(self.learner, self.cfg, self.device)

    def averaged(self) -> AbstractContextManager:
        """The network computes with the run's weight average inside the block (``train.ema_decay``)."""
        return self.ema.applied(self.model) if self.ema is not None else nullcontext()

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds as its model: the average where the run keeps one, and the learner's
        own tensors (Meta-SGD's rates: ``MetaLearner.weights``)."""
        return self.learner.weights(self.ema.average if self.ema is not None else None)

    # checkpoint state ------------------------------------------------------------------------------
    def metadata(self) -> dict:
        cfg = self.cfg
        total, adaptable = count_parameters(self.model)
        return {"name": cfg.name, "config": cfg.to_dict(), "algorithm": cfg.meta.algorithm,
                "adapt": cfg.model.adapt, "families": {"train": cfg.families.train,
                                                       "held_out": cfg.families.held_out},
                "weights": {f: cfg.families.weight(f) for f in cfg.families.train},
                "inner_lr": self.learner.inner_lr_values(), "inner_steps": cfg.meta.inner_steps,
                "step": self.step, "parameters": total, "adaptable_parameters": adaptable}

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, optimizer_info = optimizer_to_tensors(self.optimizer)
        tensors.update({OWN + k: v for k, v in self.learner.own_state().items()})  # Meta-SGD's rates
        state = {"step": self.step, "optimizer": optimizer_info, "sampler": {"seed": self.cfg.seed, "next_step": self.step}}
        if self.ema is not None:  # the checkpoint's model is the average: the live weights go on from here
            tensors.update({f"{LIVE}{k}": v.detach() for k, v in self.model.state_dict().items()})
            state["ema"] = {"decay": self.ema.decay, "updates": self.ema.updates}
        return tensors, state

    def load_state(self, ckpt: Checkpoint) -> None:
        """Resume: weights, optimizer, learned inner rates and the sampler's position.

        A conditioned run resumes from an unconditioned checkpoint: the conditioning parameters keep their
        initial values and start with fresh optimizer state (the others' AdamW moments carry over); so do a
        grown network's new blocks, and a told table that has gained families (appended to the saved ones)."""
        told = from_dict(ckpt.metadata["config"]).model.hint_families if "config" in ckpt.metadata else []
        if told and list(self.model.hint_families[:len(told)]) != told:
            raise ResumeError(f"the checkpoint is told {', '.join(told)}; this config's families.train must list "
                              "them first, in that order (new families after them)")
        live = {k[len(LIVE):]: v for k, v in ckpt.training_tensors.items() if k.startswith(LIVE)}
        network = split_weights(ckpt.model)[0]
        if self.ema is not None:  # the average: the checkpoint's model (a checkpoint without one starts it here)
            load_weights(self.model, {k: v.to(self.device) for k, v in network.items()})
            self.ema = WeightEMA(self.model, self.ema.decay, ckpt.training_state.get("ema", {}).get("updates", 0))
        weights = live or network
        fresh = {f"model.{k}" for k in load_weights(self.model, {k: v.to(self.device) for k, v in weights.items()})}
        own = self.learner.own_state()
        saved = {k: v.to(self.device) for k, v in split_weights(ckpt.training_tensors)[1].items()}
        if set(saved) != set(own):
            raise ResumeError(f"the checkpoint's learner state ({', '.join(sorted(saved)) or 'none'}) is not this "
                              f"algorithm's ({', '.join(sorted(own)) or 'none'})")
        self.learner.load_state_dict({**{f"model.{k}": v for k, v in self.model.state_dict().items()}, **saved})
        names = [n for n, p in self.learner.named_parameters() if p.requires_grad]
        optimizer_from_tensors(self.optimizer, {k: v.to(self.device) for k, v in ckpt.training_tensors.items()},
                               ckpt.training_state["optimizer"],
                               positions=[i for i, n in enumerate(names) if n not in fresh])
        self.step = int(ckpt.training_state["sampler"]["next_step"])


def validate(learner: MetaLearner, cfg: Config, device: torch.device | str) -> ValidationResult:
    """PSNR on held-out families and held-out images: the input, the model zero-shot, and after
    ``adapt()`` with ``val.shots`` support pairs and ``val.steps`` steps (``metarestore.fewshot``).

    Support pairs come from training images and query pairs from the validation images, degraded by the
    same task (the support with fresh noise): the client's situation, a few examples then new images.
    Tasks are fixed (seeded per family), so the curve across steps compares like with like.
    """
    families = cfg.families.held_out or cfg.families.train
    support_sampler = PatchSampler(load_images(cfg.data.train, "train"), cfg.val.patch_size, augment=False)
    query_sampler = PatchSampler(validation_images(cfg), cfg.val.patch_size, augment=False)
    metrics: dict[str, float] = {}
    examples = []
    learner.eval()
    for family_name in families:
        task = Task.sample(family_name, cfg.val.severity, cfg.seed, "validate", family_name)
        generator = cpu_generator(stable_seed(cfg.seed, "validate", family_name, "patches"))
        support_y = support_sampler.sample(cfg.val.shots, generator).to(device)
        query_y = query_sampler.sample(cfg.val.images, generator).to(device)
        query_x = task.degrade(query_y)
        run = few_shot(learner, query_x, (task.degrade_support(support_y), support_y), steps=cfg.val.steps,
                       query_y=query_y)
        for key, value in run.scores.items():
            metrics[f"val/psnr_{key}/{family_name}"] = value
        examples.append((family_name, [query_x[0].cpu(), run.zero_shot[0].cpu(), run.adapted[0].cpu(),
                                       query_y[0].cpu()]))
    for key in ("input", "zero_shot", "adapted"):
        values = [metrics[f"val/psnr_{key}/{f}"] for f in families]
        metrics[f"val/psnr_{key}"] = sum(values) / len(values)
    return ValidationResult(metrics, examples)
