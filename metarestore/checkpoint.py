"""Checkpoints: a directory of safetensors weights plus JSON metadata; loading never unpickles.

Layout::

    model.safetensors     network weights (a run's weight average where it keeps one: ``train.ema_decay``), and
                          under ``learner.`` the learner's own (Meta-SGD's learned rates: ``MetaLearner.weights``)
    metadata.json         config, families, algorithm, inner learning rates, versions, step, file hashes
    training.safetensors  optional: optimizer and learner tensors (and then the live weights), for resuming
    training.json         optional: optimizer hyper-parameters, step, sampler state, the average's updates

Writes are atomic (a temporary directory renamed into place) and every file's SHA-256 is recorded,
so a truncated or corrupted checkpoint is refused with a clear error instead of loading garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metarestore.errors import UserError

FORMAT_VERSION = 1
MODEL_FILE, METADATA_FILE = "model.safetensors", "metadata.json"
TRAINING_FILE, TRAINING_JSON = "training.safetensors", "training.json"


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, truncated, corrupt or of an unknown format."""


@dataclass
class Checkpoint:
    metadata: dict[str, Any]
    model: dict[str, torch.Tensor]
    training_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    training_state: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.metadata.get("step", 0))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("metarestore")
    except PackageNotFoundError:
        own = "unknown"
    return {"metarestore": own, "torch": torch.__version__, "format": str(FORMAT_VERSION)}


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_checkpoint(directory: str | Path, model: dict[str, torch.Tensor], metadata: dict[str, Any],
                    training_tensors: dict[str, torch.Tensor] | None = None,
                    training_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically; an existing one at the same path is replaced."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(_contiguous_cpu(model), tmp / MODEL_FILE)
        files = [MODEL_FILE]
        if training_tensors is not None or training_state is not None:
            save_file(_contiguous_cpu(training_tensors or {}), tmp / TRAINING_FILE)
            (tmp / TRAINING_JSON).write_text(json.dumps(training_state or {}, indent=1))
            files += [TRAINING_FILE, TRAINING_JSON]
        meta = {**metadata, "format_version": FORMAT_VERSION, "versions": _versions(),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": {name: _sha256(tmp / name) for name in files}}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        for name in [*files, METADATA_FILE]:
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_metadata(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / METADATA_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint not found: {directory} (expected a directory with {METADATA_FILE})")
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a metarestore checkpoint: {METADATA_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is corrupt (not valid JSON)") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format_version')!r}")
    return meta


def load_checkpoint(directory: str | Path, training: bool = False, device: str = "cpu") -> Checkpoint:
    """Load and verify a checkpoint; ``training=True`` also loads optimizer and sampler state."""
    directory = Path(directory)
    meta = read_metadata(directory)
    wanted = [MODEL_FILE] + ([TRAINING_FILE, TRAINING_JSON] if training else [])
    for name in wanted:
        path = directory / name
        expected = meta.get("files", {}).get(name)
        if not path.is_file() or expected is None:
            raise CheckpointError(f"{directory}: {name} is missing")
        if _sha256(path) != expected:
            raise CheckpointError(f"{path} is corrupt or truncated (checksum mismatch)")
    try:
        model = load_file(directory / MODEL_FILE, device=device)
        tensors, state = {}, {}
        if training:
            tensors = load_file(directory / TRAINING_FILE, device=device)
            state = json.loads((directory / TRAINING_JSON).read_text())
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory}: cannot read checkpoint ({exc})") from None
    return Checkpoint(meta, model, tensors, state)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and plain JSON."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           info: dict[str, Any], positions: list[int] | None = None) -> None:
    """Restore what ``optimizer_to_tensors`` saved. ``positions``: where each saved parameter now sits in
    an optimizer of one group that may have gained parameters; the new ones start with no state (fresh
    moments), and so does one that has grown (a conditioning table with entries for new blocks or families)."""
    groups = info["param_groups"]
    if positions is not None:
        if len(groups) != 1 or len(optimizer.param_groups) != 1:
            raise ValueError("an optimizer that gained parameters must have one parameter group")
        saved = groups[0]["params"]
        if len(saved) != len(positions):
            raise ValueError(f"the checkpoint's optimizer holds {len(saved)} parameters, expected {len(positions)}")
        moved = dict(zip(saved, positions, strict=True))
        groups = [{**groups[0], "params": list(range(len(optimizer.param_groups[0]["params"])))}]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in info.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    if positions is not None:
        params = optimizer.param_groups[0]["params"]
        state = {moved[index]: values for index, values in state.items()
                 if all(v.shape == params[moved[index]].shape for v in values.values()
                        if torch.is_tensor(v) and v.dim() > 0)}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete step checkpoints under ``root`` (``step-000100`` ...), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / METADATA_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune_checkpoints(root: str | Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def publish(source: str | Path, target: str | Path) -> Path:
    """Copy a checkpoint's weights and metadata without its training state (what a shipped model holds)."""
    ckpt = load_checkpoint(source)
    return save_checkpoint(target, ckpt.model, ckpt.metadata)


def average(sources: list[str | Path], target: str | Path) -> Path:
    """The uniform average of several checkpoints' weights (fairseq's ``average_checkpoints``), with the last
    one's metadata: how a run's weight average (``train.ema_decay``) was judged before it had one."""
    if not sources:
        raise CheckpointError("average: no checkpoints given")
    checkpoints = [load_checkpoint(s) for s in sources]
    models = [c.model for c in checkpoints]
    last = models[-1]
    if any(set(m) != set(last) or any(m[k].shape != last[k].shape for k in last) for m in models):
        raise CheckpointError("average: the checkpoints hold different networks")
    mean = {k: (sum(m[k].double() for m in models) / len(models)).to(last[k].dtype) if last[k].is_floating_point()
            else last[k] for k in last}
    return save_checkpoint(target, mean, checkpoints[-1].metadata)


if __name__ == "__main__":  # python -m metarestore.checkpoint publish SOURCE TARGET | average TARGET SOURCE...
    import sys

    try:
        if len(sys.argv) == 4 and sys.argv[1] == "publish":  # make base-snapshot
            print(publish(sys.argv[2], sys.argv[3]))
        elif len(sys.argv) >= 4 and sys.argv[1] == "average":
            print(average(sys.argv[3:], sys.argv[2]))
        else:
            sys.exit("usage: python -m metarestore.checkpoint publish SOURCE TARGET | average TARGET SOURCE...")
    except UserError as exc:
        sys.exit(f"error: {exc}")
