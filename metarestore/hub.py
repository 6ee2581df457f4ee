"""Load a model from anywhere users name one: ``builtin:NAME`` (a model shipped inside the package), a
checkpoint directory, ``runs:/RUN/path``, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``. Always
through safetensors; never unpickles."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from metarestore.checkpoint import METADATA_FILE, CheckpointError, load_checkpoint, read_metadata
from metarestore.config import from_dict
from metarestore.errors import UserError
from metarestore.meta import MetaLearner, build_learner

CACHE = Path(os.environ.get("METARESTORE_CACHE", Path.home() / ".cache" / "metarestore"))
BUILTIN = Path(__file__).resolve().parent / "weights"  # shipped models, one folder each (with MODEL_CARD.md)
DEFAULT_MODEL = "builtin:base"  # what every command and the server use when no model is named


class ModelNotFoundError(UserError, LookupError):
    """No model at that URI."""


@dataclass
class ModelRef:
    uri: str  # what the user gave
    path: Path  # the local checkpoint directory
    name: str | None = None  # registered model name, when from the registry
    version: str | None = None


def _find_checkpoint(root: Path) -> Path:
    if (root / METADATA_FILE).is_file():
        return root
    found = sorted(p.parent for p in root.rglob(METADATA_FILE))
    if not found:
        raise ModelNotFoundError(f"no metarestore checkpoint inside {root}")
    return found[0]


URI_SCHEMES = ("models:/", "runs:/", "builtin:")


def portable_uri(uri: str) -> str:
    """``uri`` as another process in another directory (a Serve replica, a Ray worker) reads it: model
    URIs as they are, a checkpoint path made absolute."""
    uri = str(uri)
    return uri if uri.startswith(URI_SCHEMES) else str(Path(uri).expanduser().resolve())


def resolve(uri: str, tracking_uri: str | None = None) -> ModelRef:
    """Turn a model URI into a local checkpoint directory (downloaded and cached for MLflow URIs)."""
    uri = str(uri)
    if uri.startswith("builtin:"):
        return _builtin(uri)
    if not uri.startswith(("models:/", "runs:/")):
        path = Path(uri).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"model not found: {uri} (give a checkpoint directory, models:/NAME@ALIAS, "
                                     "models:/NAME/VERSION or runs:/RUN_ID/PATH)")
        return ModelRef(uri, _find_checkpoint(path))

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from metarestore.tracking import fail_fast_http, mlflow_uris, resolve_uri

    fail_fast_http()
    tracking = resolve_uri(tracking_uri)
    name = version = None
    try:
        stamp = ""
        if uri.startswith("models:/"):
            from mlflow.store.artifact.utils.models import get_model_name_and_version

            client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
            resolved = get_model_name_and_version(client, uri)
            if len(resolved) == 2:
                name, version = resolved
                stamp = str(client.get_model_version(name, version).creation_timestamp)
        source = f"models:/{name}/{version}" if version is not None else uri
        key = hashlib.sha256(f"{tracking}|{source}|{stamp}".encode()).hexdigest()[:16]
        target = CACHE / key
        if not target.is_dir():
            with mlflow_uris(tracking):
                _download(source, target)
    except MlflowException as exc:
        raise ModelNotFoundError(f"model not found: {uri} ({exc.message.splitlines()[0][:200]})") from None
    except OSError as exc:
        raise ModelNotFoundError(f"cannot fetch {uri}: {exc}") from None
    return ModelRef(uri, _find_checkpoint(target), name, version)


def builtin_names() -> list[str]:
    return sorted(p.name for p in BUILTIN.iterdir() if (p / METADATA_FILE).is_file()) if BUILTIN.is_dir() else []


def _builtin(uri: str) -> ModelRef:
    name = uri.split(":", 1)[1]
    path = BUILTIN / name
    if not name or "/" in name or not (path / METADATA_FILE).is_file():
        known = ", ".join(f"builtin:{n}" for n in builtin_names()) or "none in this installation"
        raise ModelNotFoundError(f"no built-in model {uri!r} (shipped: {known})")
    return ModelRef(uri, path, name=f"builtin:{name}")


def _download(source: str, target: Path) -> None:
    """Download into a private folder, then rename it into place: replicas starting together never read
    each other's half-written files, and an interrupted download leaves nothing behind."""
    import mlflow

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:  # another process got there first: theirs is complete too
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_families(metadata: dict) -> tuple[list[str], list[str]]:
    """(restored, held out): the families a model restores, those its last run trained and the rows it can
    be told from earlier runs (a fine-tune of the told table alone, ``configs/base-chains.yaml``, trains
    fewer than the model restores), told rows first; and the families it never trained on."""
    held_out = list(metadata["families"]["held_out"])
    told = metadata.get("config", {}).get("model", {}).get("hint_families") or []
    restored = [f for f in dict.fromkeys([*told, *metadata["families"]["train"]]) if f not in held_out]
    return restored, held_out


def learner_from_metadata(metadata: dict, device: torch.device | str = "cpu") -> MetaLearner:
    """A saved model's learner, weights not yet loaded (``build_learner`` with its config and inner rates)."""
    return build_learner(from_dict(metadata["config"]), device, inner_lrs=metadata["inner_lr"])


def load_learner(path: str | Path, device: torch.device | str = "cpu") -> tuple[MetaLearner, dict]:
    """A ready MetaLearner (eval mode) and the checkpoint's metadata, from a checkpoint directory."""
    ckpt = load_checkpoint(path, device="cpu")
    learner = learner_from_metadata(ckpt.metadata, device)
    learner.load_weights(ckpt.model)
    learner.eval()
    return learner, ckpt.metadata


def load_model(uri: str, tracking_uri: str | None = None,
               device: torch.device | str = "cpu") -> tuple[MetaLearner, dict, ModelRef]:
    ref = resolve(uri, tracking_uri)
    learner, metadata = load_learner(ref.path, device)
    return learner, metadata, ref


__all__ = ["DEFAULT_MODEL", "CheckpointError", "ModelNotFoundError", "ModelRef", "load_learner", "load_model", "read_metadata",
           "resolve"]
