"""A quick look at a model: restore held-out images degraded by every family, print PSNR before and
after (and, for held-out families, after the adapter a server fits from a few pairs), save an image grid.
``make demo`` ends here."""

from __future__ import annotations

import functools
from pathlib import Path

from metarestore.config import from_dict
from metarestore.data import EMBEDDED, PatchSampler, load_images
from metarestore.degradations.base import cpu_generator, stable_seed
from metarestore.engine import validation_images
from metarestore.fewshot import Task, few_shot
from metarestore.hub import model_families
from metarestore.inference import SERVED_STEPS, fit_as_served, restore_as_asked
from metarestore.meta import MetaLearner
from metarestore.metrics import psnr
from metarestore.viz import save_grid


def showcase(learner: MetaLearner, metadata: dict, out_dir: str | Path, severity: float = 0.5, shots: int = 4,
             steps: int = SERVED_STEPS, size: int = 128, seed: int = 0, data: str = EMBEDDED) -> list[dict]:
    """``data``: ``embedded`` (always there), ``model`` (the folders the model was trained and validated
    on, when this machine has them) or a folder. A model that can be told the degradation is told each
    family it knows (as a client that knows what happened to its images would); the rest is blind. A
    held-out family is also restored by the adapter a server with default settings fits from ``shots``
    pairs (``fit_as_served``, path auto, ``steps`` gradient steps for an adapted path): the product's answer."""
    cfg = from_dict(metadata["config"])
    known, held_out = model_families(metadata)
    if data == "model":
        query_images, support_images = validation_images(cfg), load_images(cfg.data.train, "train")
    elif data == EMBEDDED:
        query_images, support_images = load_images(EMBEDDED, "val"), load_images(EMBEDDED, "train")
    else:
        query_images = support_images = load_images(data, "all")
    query = PatchSampler(query_images, size, augment=False)
    support = PatchSampler(support_images, size, augment=False)
    rows, grid = [], []
    device = next(learner.parameters()).device
    told = set(learner.hint_families)
    for name in [*known, *held_out]:
        task = Task.sample(name, severity, seed, "showcase", name)
        g = cpu_generator(stable_seed(seed, "showcase", name, "patches"))
        clean = query.sample(2, g).to(device)
        degraded = task.degrade(clean)
        run = few_shot(learner, degraded, query_y=clean, family=name if name in told else None,
                       restore=functools.partial(restore_as_asked, tile=None))
        row = {"family": name, "held_out": name in held_out, "told": name in told, "psnr_input": run.scores["input"],
               "psnr_restored": run.scores["zero_shot"]}
        adapted = None
        if name in held_out:
            support_y = support.sample(shots, g).to(device)
            adapter = fit_as_served(learner, task.degrade_support(support_y), support_y, steps=steps)
            adapted = adapter.restore(degraded).to(device)
            row.update(psnr_adapted=psnr(adapted, clean), path=adapter.path.name)
            adapted = adapted[0]
        label = name + (f" (held out: {row['path']})" if name in held_out else "")
        grid.append((label, [degraded[0], run.zero_shot[0], adapted, clean[0]]))
        rows.append(row)
    out_dir = Path(out_dir)
    save_grid(grid, ["degraded", "restored", f"adapted ({shots} shots)", "clean"], out_dir / "showcase.png",
              title=f"{metadata.get('name', '')}: severity {severity}")
    return rows


IMPROVED_DB = 0.5  # a family counts as improved only from this gain on: smaller is within the noise


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'family':<44}{'input':>9}{'restored':>10}{'adapted':>9}{'gain':>8}"]
    for r in rows:
        best = r.get("psnr_adapted", r["psnr_restored"])
        adapted = f"{r['psnr_adapted']:9.2f}" if "psnr_adapted" in r else f"{'-':>9}"
        label = r["family"] + (" (held out)" if r["held_out"] else "") + (" (told)" if r.get("told") else "")
        label += f" [{r['path']}]" if "path" in r else ""
        lines.append(f"{label:<44}{r['psnr_input']:9.2f}{r['psnr_restored']:10.2f}{adapted}{best - r['psnr_input']:+8.2f}")
    gains = {r["family"]: r.get("psnr_adapted", r["psnr_restored"]) - r["psnr_input"] for r in rows}
    improved = [f for f, gain in gains.items() if gain >= IMPROVED_DB]
    lines.append(f"improved by >= {IMPROVED_DB} dB: {len(improved)} of {len(rows)} families")
    worse = [f"{f} ({gain:+.2f} dB)" for f, gain in gains.items() if gain < 0]
    lines.append(f"worse than the input: {', '.join(worse) if worse else 'none'}")
    return "\n".join(lines)
