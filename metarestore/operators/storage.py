"""An adapter's bytes: safetensors (tensors plus a JSON header, never a pickle).

The tensors: each fitted operator's own (``Operator.tensors``: ``kernel``, ``tone.curves``, ...,
``synthetic.jpeg.<parameter>``) and the adapted restorer's state under its kind (``film.<parameter>``,
``lora.<module>.lora_a``). The header (metadata ``adapter``): format, version, path, the operators'
residuals, each operator's own settings (``operators``: name -> ``Operator.header``) and the info.
Version 1 (before operators had one interface) kept the haze's omega as ``haze_omega`` and the synthetic
operators' settings under ``synthetic``; it is read as well, with the same tensor names.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from metarestore.errors import UserError
from metarestore.model.kinds import get_kind
from metarestore.operators.base import OPERATORS
from metarestore.operators.paths import Operators, Path

if TYPE_CHECKING:
    from metarestore.operators.adapter import Adapter

FORMAT = "metarestore-operator-adapter"
VERSION = 2
READS = (1, 2)  # the versions this code reads


class AdapterError(UserError, ValueError):
    """Support pairs or a stored adapter that cannot be used."""


def to_bytes(adapter: Adapter) -> bytes:
    tensors = adapter.operators.tensors()
    for name, value in (adapter.params or {}).items():  # e.g. film.<parameter>, lora.<module>.lora_a
        tensors[f"{adapter.path.restorer}.{name}"] = value.detach().float().cpu().contiguous()
    header = {"format": FORMAT, "version": VERSION, "path": adapter.path.name,
              "residuals": adapter.operators.residuals, "operators": adapter.operators.headers(),
              "info": adapter.info}
    return st_save(tensors, metadata={"adapter": json.dumps(header)})


def from_bytes(data: bytes, learner) -> tuple[Path, Operators, dict[str, torch.Tensor] | None, dict]:
    """(path, operators, adapted state, info) of an adapter's bytes; ``AdapterError`` when they are not one."""
    try:
        tensors = st_load(data)
        header = json.loads(metadata(data)["adapter"])
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad adapter
        raise AdapterError(f"not a metarestore operator adapter: {exc}") from None
    if header.get("format") != FORMAT or header.get("version") not in READS:
        raise AdapterError("not a metarestore operator adapter (format/version mismatch)")
    try:
        path = Path.parse(str(header["path"]))
        learner.hint(path.told)
        ops = _read_operators(header, tensors, learner)
    except ValueError as exc:
        raise AdapterError(str(exc)) from None
    if path.operator is not None and path.operator.name not in ops.fits:
        raise AdapterError(f"path {path.name} needs the {path.operator.name} operator, which is missing")
    return path, ops, _read_params(path, tensors, learner), header.get("info", {})


def _read_operators(header: dict, tensors: dict[str, torch.Tensor], learner) -> Operators:
    residuals = {str(k): float(v) for k, v in header.get("residuals", {}).items()}
    settings = header.get("operators") if header["version"] >= 2 else {
        "haze": {"omega": header.get("haze_omega")}, **(header.get("synthetic") or {})}  # version 1
    ops = Operators()
    for name, op in OPERATORS.items():
        fit = op.read(tensors, (settings or {}).get(name) or {}, residuals.get(name, float("nan")), learner)
        if fit is not None:
            ops.fits[name] = fit
    return ops


def _read_params(path: Path, tensors: dict[str, torch.Tensor], learner) -> dict[str, torch.Tensor] | None:
    """The adapted restorer's state of the kind ``path.restorer`` names, checked against the model."""
    if not path.adapted:
        return None
    prefix = f"{path.restorer}."
    params = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        get_kind(path.restorer).check(learner.model, params)
    except ValueError as exc:
        raise AdapterError(f"the adapted {path.restorer} state does not fit this model: {exc}") from None
    own = next(learner.model.parameters())
    return {n: v.to(own.device, own.dtype) for n, v in params.items()}


def metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its JSON header, 8-byte little-endian length first)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n].decode("utf-8")).get("__metadata__", {})


def read_film_deltas(data: bytes, learner, problem: str) -> dict[str, torch.Tensor]:
    """The FiLM state of a plain safetensors file of FiLM deltas (parameter name -> adapted minus
    meta-learned value: what servers stored before operator adapters); ``problem``: why it is not an
    operator adapter, for the error when it is neither."""
    from metarestore.meta.adapt import apply_delta

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
    return apply_delta(learner.model, tensors, "film")
