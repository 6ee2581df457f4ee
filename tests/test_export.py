"""Export: ONNX (run by onnxruntime) and TorchScript give the model's own output, adapter included, at a
size the network handles without padding and at one that needs it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import torch
from safetensors.torch import save_file

from conftest import cli_in_process
from metarestore import degradations
from metarestore.export import ExportError, load_adapter
from metarestore.hub import load_model
from metarestore.meta.adapt import delta

SIZES = [(256, 256), (250, 190)]  # 250x190 is not a multiple of the smoke network's 4: padded inside


@pytest.fixture(scope="module")
def adapted(perturbed_smoke_checkpoint, tmp_path_factory):
    """The model, an adapter made by adapt() on two real hazy pairs (saved as safetensors), and the test
    images: crops of another photograph degraded the same way."""
    learner, _, _ = load_model(perturbed_smoke_checkpoint)
    family = degradations.get("haze")
    params = family.sample(0.6, torch.Generator().manual_seed(0))
    clean = torch.stack([torch.from_numpy(im[:64, :64]).permute(2, 0, 1).float() / 255
                         for im in (skimage.data.astronaut(), skimage.data.coffee())])
    adapted_params = learner.adapt(family(clean, params), clean, steps=5)
    path = tmp_path_factory.mktemp("adapter") / "haze.safetensors"
    save_file({k: v.contiguous() for k, v in delta(learner.model, adapted_params).items()}, path)
    photo = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 255
    inputs = {size: family(photo[..., :size[0], :size[1]].contiguous(), params) for size in SIZES}
    return learner, path, inputs


def expected(learner, adapter_path, x):
    """The model's own output with the adapter applied at call time (not merged)."""
    return load_adapter(adapter_path, learner).restore(x).numpy()


@pytest.mark.slow
def test_onnx_export_with_adapter_matches_the_model(perturbed_smoke_checkpoint, adapted, workdir):
    import onnxruntime

    learner, adapter, inputs = adapted
    out = workdir / "model.onnx"
    proc = subprocess.run([sys.executable, "-m", "metarestore_cli", "export", "--model", perturbed_smoke_checkpoint,
                           "--adapter", str(adapter), "--format", "onnx", "-o", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "input 'image'" in proc.stdout and out.is_file()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for size, x in inputs.items():
        got = session.run(None, {"image": x.numpy()})[0]
        want = expected(learner, adapter, x)
        assert got.shape == want.shape == (1, 3, *size)
        assert np.abs(got - want).max() <= 1e-3, size
        assert np.abs(got - learner.restore(x).numpy()).max() > 1e-3, "the adapter is merged in"
    both = torch.cat([inputs[(250, 190)]] * 2)  # a batch of two, same size
    assert np.abs(session.run(None, {"image": both.numpy()})[0][1] - expected(learner, adapter, both)[1]).max() <= 1e-3


@pytest.mark.slow
def test_torchscript_export_with_adapter_matches_the_model(perturbed_smoke_checkpoint, adapted, workdir):
    from metarestore.export import export

    learner, adapter, inputs = adapted
    info = export(perturbed_smoke_checkpoint, "torchscript", workdir / "model.pt", adapter=adapter)
    scripted = torch.jit.load(info["path"])
    for size, x in inputs.items():
        with torch.no_grad():
            got = scripted(x).numpy()
        assert got.shape == (1, 3, *size)
        assert np.abs(got - expected(learner, adapter, x)).max() <= 1e-3, size


def test_an_adapter_for_another_model_is_refused(perturbed_smoke_checkpoint, workdir, capsys):
    learner, _, _ = load_model(perturbed_smoke_checkpoint)
    name, param = next(iter(learner.model.named_parameters()))
    wrong = workdir / "wrong.safetensors"
    save_file({name: torch.zeros(param.numel() + 1)}, wrong)
    with pytest.raises(ExportError, match="does not fit this model"):
        load_adapter(wrong, learner)
    save_file({"no.such.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ExportError, match="no parameter 'no.such.weight'"):
        load_adapter(wrong, learner)
    (workdir / "junk.safetensors").write_bytes(b"not a safetensors file")
    proc = cli_in_process(capsys, "export", "--model", perturbed_smoke_checkpoint,
                          "--adapter", str(workdir / "junk.safetensors"), "-o", str(workdir / "m.onnx"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "not a safetensors adapter" in errors[0], proc.stderr
    assert not (workdir / "m.onnx").exists()


@pytest.mark.slow
def test_a_stored_lora_adapter_exports_by_its_id_and_operator_paths_are_refused(perturbed_smoke_checkpoint, workdir):
    """A server's stored adapter (``ID.safetensors`` + ``ID.json`` in its adapter directory), here of the
    lora kind, is merged by ID; an adapter whose path deconvolves first cannot be, and says why."""
    import json

    from metarestore.export import export
    from metarestore.operators.adapter import fit_adapter

    learner, metadata, _ = load_model(perturbed_smoke_checkpoint)
    family = degradations.get("color_cast")
    params = family.sample(0.8, torch.Generator().manual_seed(1))
    clean = torch.stack([torch.from_numpy(im[:64, :64]).permute(2, 0, 1).float() / 255
                         for im in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.rocket())])
    store = workdir / "adapters"
    store.mkdir()
    sha = metadata["files"]["model.safetensors"]
    for adapter_id, path in (("lora-one", "lora"), ("deconv-one", "deconv@0.01")):
        made = fit_adapter(learner, family(clean, params), clean, paths=[path], steps=3)
        (store / f"{adapter_id}.safetensors").write_bytes(made.to_bytes())
        (store / f"{adapter_id}.json").write_text(json.dumps({"info": {"model_sha256": sha}}))
    lora = load_adapter("lora-one", learner, str(store))
    assert lora.path.name == "lora"
    info = export(perturbed_smoke_checkpoint, "torchscript", workdir / "lora.pt", adapter="lora-one",
                  adapter_dir=str(store))
    x = family(torch.from_numpy(skimage.data.chelsea()[:96, :80]).permute(2, 0, 1).float()[None] / 255, params)
    with torch.no_grad():
        got = torch.jit.load(info["path"])(x)
    assert (got - lora.restore(x)).abs().max() <= 1e-4
    assert (got - learner.restore(x)).abs().max() > 1e-3, "the lora adapter is merged in"
    with pytest.raises(ExportError, match="cannot be merged"):
        export(perturbed_smoke_checkpoint, "torchscript", workdir / "d.pt", adapter="deconv-one", adapter_dir=str(store))
    (store / "lora-one.json").write_text(json.dumps({"info": {"model_sha256": "0" * 64}}))
    with pytest.raises(ExportError, match="made for another model"):
        export(perturbed_smoke_checkpoint, "torchscript", workdir / "e.pt", adapter="lora-one", adapter_dir=str(store))
    with pytest.raises(ExportError, match="no adapter nope"):
        export(perturbed_smoke_checkpoint, "torchscript", workdir / "f.pt", adapter="nope", adapter_dir=str(store))
    assert not any((workdir / n).exists() for n in ("d.pt", "e.pt", "f.pt"))


def test_a_told_model_exports_told_its_degradation_or_the_one_its_adapter_names(told_checkpoint, workdir,
                                                                                perturbed_smoke_checkpoint):
    """--degradation (or a told:F adapter) bakes the family's row into the exported graph; a blind model
    cannot be told, and an adapter's family cannot be contradicted."""
    from metarestore.export import export
    from metarestore.operators.adapter import fit_adapter

    learner, _, _ = load_model(told_checkpoint)
    x = torch.rand(2, 3, 37, 50, generator=torch.Generator().manual_seed(0))
    info = export(told_checkpoint, "torchscript", workdir / "jpeg.pt", degradation="jpeg")
    assert info["degradation"] == "jpeg"
    with torch.no_grad():
        got = torch.jit.load(info["path"])(x)
    torch.testing.assert_close(got, learner.restore(x, family="jpeg"), atol=1e-4, rtol=0)
    assert not torch.allclose(got, learner.restore(x), atol=1e-3)
    import onnxruntime

    onnx = export(told_checkpoint, "onnx", workdir / "jpeg.onnx", degradation="jpeg")  # the row, any batch size
    session = onnxruntime.InferenceSession(onnx["path"], providers=["CPUExecutionProvider"])
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"image": x.numpy()})[0]),
                               learner.restore(x, family="jpeg"), atol=1e-4, rtol=0)
    clean = learner.restore(x, family="gaussian_blur")
    adapter = fit_adapter(learner, x, clean, paths=["told:gaussian_blur"])
    adapter.save(workdir / "told")
    info = export(told_checkpoint, "torchscript", workdir / "blur.pt", adapter=workdir / "told" / "adapter.safetensors")
    assert info["degradation"] == "gaussian_blur"
    with pytest.raises(ExportError, match="contradicts"):
        export(told_checkpoint, "torchscript", workdir / "x.pt", adapter=workdir / "told" / "adapter.safetensors",
               degradation="jpeg")
    with pytest.raises(ExportError, match="blind"):
        export(perturbed_smoke_checkpoint, "torchscript", workdir / "x.pt", degradation="jpeg")
    twice = fit_adapter(learner, x, clean, paths=["told:gaussian_blur*2"])
    twice.save(workdir / "twice")
    with pytest.raises(ExportError, match="2 times"):  # one pass is exported, not a wrong graph
        export(told_checkpoint, "torchscript", workdir / "x.pt", adapter=workdir / "twice" / "adapter.safetensors")
    assert not (workdir / "x.pt").exists()
