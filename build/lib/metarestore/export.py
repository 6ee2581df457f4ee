"""Export a restorer (optionally with an adapter merged into its weights) to ONNX or TorchScript, for
runtimes outside Python: onnxruntime, chaiNNer, mobile.

The exported graph takes a float32 (N, 3, H, W) image in [0, 1] with any batch, height and width
(H, W >= the network's padding multiple, 2**stages) and returns the restored image of the same size,
clamped to [0, 1] as ``MetaLearner.restore`` does. The network pads to that multiple internally; both
formats keep that padding symbolic, so one file serves every size. ONNX goes through torch.export
(``torch.onnx.export(dynamo=True)``, extra ``metarestore[export]``); TorchScript through
``torch.jit.trace`` at a size that needs padding (the tracer records the shape arithmetic).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from metarestore.errors import UserError

FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME = "image", "restored"


class ExportError(UserError):
    """An adapter that does not fit the model, a missing exporter, an unknown format."""


class Restorer(nn.Module):
    """What is exported: the network with its output clamped to [0, 1], told one degradation (a constant
    row of a model that can be told it: ``hint``) or blind."""

    def __init__(self, net: nn.Module, hint: torch.Tensor | None = None, degradation: str | None = None):
        super().__init__()
        self.net = net
        self.register_buffer("hint", hint)  # None: blind
        self.degradation = degradation  # the family ``hint`` names

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (self.net(image) if self.hint is None else self.net(image, self.hint)).clamp(0, 1)


def adapter_bytes(spec: str | Path, adapter_dir: str | None = None, model_sha256: str | None = None) -> bytes:
    """The bytes of the adapter ``spec``: a file, or the ID of an adapter a server stored in
    ``adapter_dir`` (an fsspec URI or directory; default METARESTORE_CACHE/adapters, the server's default),
    checked against the model it was made for when the store recorded it."""
    import fsspec

    from metarestore.hub import CACHE

    path = Path(spec)
    if path.is_file():
        return path.read_bytes()
    text = str(spec)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", text):
        raise ExportError(f"adapter not found: {text} (give an adapter file or the ID of a stored adapter)")
    root = str(adapter_dir or CACHE / "adapters")
    fs, base = fsspec.core.url_to_fs(root)
    stored = f"{base.rstrip('/')}/{text}"
    if not fs.exists(f"{stored}.safetensors"):
        raise ExportError(f"adapter not found: no file {text} and no adapter {text} in {root}")
    if model_sha256 and fs.exists(f"{stored}.json"):
        made_for = json.loads(fs.cat_file(f"{stored}.json")).get("info", {}).get("model_sha256")
        if made_for and made_for != model_sha256:
            raise ExportError(f"adapter {text} was made for another model (sha256 {made_for[:12]}...); export "
                              "it with that model")
    return fs.cat_file(f"{stored}.safetensors")


def load_adapter(spec: str | Path, learner, adapter_dir: str | None = None, model_sha256: str | None = None):
    """The adapter ``spec`` (file or stored ID, see ``adapter_bytes``) read for ``learner``."""
    from metarestore.operators.adapter import AdapterError, read_adapter

    try:
        return read_adapter(adapter_bytes(spec, adapter_dir, model_sha256), learner)
    except AdapterError as exc:
        raise ExportError(f"adapter {spec}: {exc}") from None


def merge_adapter(learner, adapter) -> None:
    """Write the adapter's adapted state into the network's own weights (in place). Only adapters whose
    path is the network alone (zero-shot, or adapted FiLM/LoRA/...) can be merged: an operator pre-step
    (deconvolution, tone or haze inversion) or a classical path is not part of the network."""
    from metarestore.model import get_kind

    path = adapter.path
    if path.pre != "none" or path.restorer == "none":
        raise ExportError(f"the adapter's path {path.name} runs a fitted operator before (or instead of) the "
                          "network, which cannot be merged into its weights; export an adapter made with "
                          "kind film or lora (or restore with the server)")
    if not path.adapted:
        return
    model = learner.model
    merged = get_kind(path.restorer).parameters(model, adapter.params)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in merged:
                param.copy_(merged[name])


def exportable(model_uri: str, adapter: str | Path | None = None, tracking_uri: str | None = None,
               adapter_dir: str | None = None, degradation: str | None = None) -> tuple[Restorer, dict]:
    """The model at ``model_uri`` (adapter merged; told ``degradation``, or the family a ``told:F`` adapter
    names), ready to export; and the checkpoint's metadata."""
    from metarestore.hub import load_model

    learner, metadata, _ = load_model(model_uri, tracking_uri)
    if adapter is not None:
        sha = metadata.get("files", {}).get("model.safetensors")
        loaded = load_adapter(adapter, learner, adapter_dir, sha)
        told = loaded.path.told
        if loaded.path.passes > 1:
            raise ExportError(f"the adapter's path {loaded.path.name} runs the network {loaded.path.passes} times; "
                              "export exports one pass (export without the adapter, told --degradation "
                              f"{told}, and run it {loaded.path.passes} times)")
        if told is not None and degradation not in (None, told):
            raise ExportError(f"the adapter restores told {told!r}; --degradation {degradation!r} contradicts it")
        degradation = told or degradation
        merge_adapter(learner, loaded)
    try:
        hint = learner.hint(degradation)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    return Restorer(learner.model, hint, degradation).eval(), metadata


def multiple(model: nn.Module) -> int:
    """The size the network pads to; exported graphs accept H, W >= this."""
    net = model.net if isinstance(model, Restorer) else model
    return int(getattr(net, "multiple", 1))


def _example(model: nn.Module) -> torch.Tensor:
    m = multiple(model)
    return torch.rand(1, 3, 4 * m + m // 2 + 1, 5 * m + 1)  # a size that needs padding in both directions


def _write_atomically(out: Path, write) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def to_onnx(model: Restorer, out: Path, opset: int | None = None) -> None:
    try:
        import onnx  # noqa: F401  (torch.onnx needs it, and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs the optional extra: pip install 'metarestore[export]'") from None
    m = multiple(model)
    dims = {2: torch.export.Dim("height", min=m, max=2**15), 3: torch.export.Dim("width", min=m, max=2**15),
            0: torch.export.Dim("batch", min=1, max=1024)}

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (_example(model),), tmp, dynamo=True, external_data=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False,
                              dynamic_shapes={"image": dims})

    _write_atomically(out, write)


def to_torchscript(model: Restorer, out: Path) -> None:
    def write(tmp: str) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; still loads in C++
            traced = torch.jit.trace(model, _example(model), check_trace=False)
            traced.save(tmp)

    _write_atomically(out, write)


def export(model_uri: str, fmt: str, out: str | Path, adapter: str | Path | None = None,
           tracking_uri: str | None = None, adapter_dir: str | None = None, degradation: str | None = None) -> dict:
    """Export ``model_uri`` (with ``adapter`` merged, told ``degradation``) to ``out``; returns what was written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out} is a directory; give the output file")
    model, metadata = exportable(model_uri, adapter, tracking_uri, adapter_dir, degradation)
    torch.manual_seed(0)  # the example input
    (to_onnx if fmt == "onnx" else to_torchscript)(model, out)
    return {"path": str(out), "format": fmt, "bytes": out.stat().st_size, "min_size": multiple(model),
            "input": INPUT_NAME, "output": OUTPUT_NAME, "adapter": str(adapter) if adapter else None,
            "degradation": model.degradation,
            "algorithm": metadata.get("algorithm"), "step": metadata.get("step")}
