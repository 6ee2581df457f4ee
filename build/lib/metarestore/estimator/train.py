"""Training the estimator: random crops of a folder of clean photos, degraded as ``synthesis`` draws
(clean, one family, or a chain), a multi-label presence loss and a severity loss where present.

The state (weights, AdamW, step) is one safetensors checkpoint overwritten every ``checkpoint_every``
steps, so a run resumes where it stopped.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from metarestore.checkpoint import (
    CheckpointError,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_metadata,
    save_checkpoint,
)
from metarestore.data.episodes import PatchSampler
from metarestore.data.images import load_images
from metarestore.degradations.base import cpu_generator
from metarestore.estimator.estimate import THRESHOLD
from metarestore.estimator.labels import LABELS
from metarestore.estimator.network import EstimatorNet
from metarestore.estimator.synthesis import batch
from metarestore.progress import Progress


def learning_rate(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_estimator(data: str, out: str | Path, steps: int = 6000, batch_size: int = 32, crop: int = 96,
                    lr: float = 2e-3, seed: int = 0, resume: bool = False, checkpoint_every: int = 250,
                    log_every: int = 50, spectral_bins: int = 0, stream=None) -> Path:
    """Train (or, with ``resume``, continue) an estimator on ``data`` (a folder or ``embedded``); returns the
    checkpoint directory ``out``."""
    stream = stream or sys.stdout
    out = Path(out)
    if resume and out.is_dir():  # the run's own network, whatever this call says
        spectral_bins = int(read_metadata(out).get("spectral_bins", 0))
    net = EstimatorNet(LABELS, spectral_bins=spectral_bins)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    start = 0
    if resume and out.is_dir():
        try:
            ckpt = load_checkpoint(out, training=True)
        except CheckpointError as exc:
            raise CheckpointError(f"cannot resume the estimator from {out}: {exc}") from None
        net.load_state_dict(ckpt.model)
        optimizer_from_tensors(opt, ckpt.training_tensors, ckpt.training_state["optimizer"])
        start = int(ckpt.metadata["step"])
    sampler = PatchSampler(load_images(data), crop)
    progress = Progress(steps, start, stream=stream)
    seen = 0.0
    for step in range(start, steps):
        gen = cpu_generator(seed * 1_000_003 + step)
        x, present, severity = batch(sampler.sample(batch_size, gen), gen)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        logits, sev = net(x)
        loss = F.binary_cross_entropy_with_logits(logits, present)
        there = (present > 0).float()
        loss = loss + (there * (sev - severity).abs()).sum() / there.sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        seen = 0.98 * seen + 0.02 * loss.item() if step > start else loss.item()
        done = step + 1
        if done % log_every == 0 or done == steps:
            progress.print(done, loss=seen)
        if done % checkpoint_every == 0 or done == steps:
            tensors, state = optimizer_to_tensors(opt)
            save_checkpoint(out, net.state_dict(), {
                "kind": "estimator", "step": done, "steps": steps, "labels": list(LABELS), "crop": crop,
                "grid": 3, "threshold": THRESHOLD, "widths": [16, 32, 48, 64, 96], "data": data, "seed": seed,
                "spectral_bins": spectral_bins,
                "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                tensors, {"optimizer": state})
    return out
