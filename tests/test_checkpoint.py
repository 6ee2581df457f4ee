"""Checkpoints: exact round trip, atomic replacement, corrupt files refused, no pickle anywhere."""

import json

import pytest
import torch

from metarestore.checkpoint import (
    CheckpointError,
    average,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    prune_checkpoints,
    save_checkpoint,
)
from metarestore.model import RestorationNet


def trained_optimizer(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.rand(1, 3, 16, 16)).mean().backward()
        opt.step()
    return opt


def test_average_is_the_mean_of_the_weights_with_the_last_metadata(tmp_path):
    nets = [RestorationNet(width=8) for _ in range(3)]
    for i, net in enumerate(nets):
        torch.manual_seed(i)
        for p in net.parameters():
            torch.nn.init.normal_(p)
    paths = [save_checkpoint(tmp_path / f"s{i}", n.state_dict(), {"step": i}) for i, n in enumerate(nets)]
    mean = load_checkpoint(average(paths, tmp_path / "mean"))
    assert mean.step == 2
    for name in nets[0].state_dict():
        torch.testing.assert_close(mean.model[name], sum(n.state_dict()[name] for n in nets) / 3)
    other = save_checkpoint(tmp_path / "wide", RestorationNet(width=16).state_dict(), {"step": 9})
    with pytest.raises(CheckpointError, match="different networks"):
        average([paths[0], other], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_the_maintainer_command_says_error_and_writes_nothing(tmp_path):
    """``python -m metarestore.checkpoint average|publish`` (make base-snapshot): one ``error:`` line, exit 1."""
    import subprocess
    import sys

    good = save_checkpoint(tmp_path / "good", RestorationNet(width=8).state_dict(), {"step": 1})
    done = subprocess.run([sys.executable, "-m", "metarestore.checkpoint", "average", str(tmp_path / "out"),
                           str(tmp_path / "missing"), str(good)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"error: checkpoint not found: {tmp_path / 'missing'} (expected a directory with metadata.json)"]
    assert not (tmp_path / "out").exists()


def test_round_trip_is_exact(tmp_path):
    model = RestorationNet(width=8)
    opt = trained_optimizer(model)
    tensors, info = optimizer_to_tensors(opt)
    path = save_checkpoint(tmp_path / "ck", model.state_dict(), {"step": 7, "algorithm": "maml"}, tensors,
                           {"optimizer": info, "step": 7})
    ck = load_checkpoint(path, training=True)
    assert ck.step == 7 and ck.metadata["algorithm"] == "maml"
    for name, value in model.state_dict().items():
        assert torch.equal(ck.model[name], value)
    fresh = RestorationNet(width=8)
    fresh.load_state_dict(ck.model)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    optimizer_from_tensors(opt2, ck.training_tensors, ck.training_state["optimizer"])
    before, after = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert sorted(before) == sorted(after) and before
    for index, values in before.items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after[index][key]))


def test_files_are_safetensors_and_json_only(tmp_path):
    path = save_checkpoint(tmp_path / "ck", {"w": torch.ones(2)}, {"step": 1}, {"o": torch.zeros(1)}, {"a": 1})
    assert sorted(p.name for p in path.iterdir()) == ["metadata.json", "model.safetensors", "training.json",
                                                      "training.safetensors"]
    meta = json.loads((path / "metadata.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "training.safetensors", "training.json"}


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_checkpoint_is_refused(tmp_path, damage):
    path = save_checkpoint(tmp_path / "ck", RestorationNet(width=8).state_dict(), {"step": 1})
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        weights.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        weights.unlink()
    with pytest.raises(CheckpointError, match="corrupt|truncated|missing"):
        load_checkpoint(path)


def test_bad_metadata_and_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    path = save_checkpoint(tmp_path / "ck", {"w": torch.ones(2)}, {"step": 1})
    (path / "metadata.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


def test_overwrite_is_atomic_and_failed_write_keeps_old(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "ck", {"w": torch.ones(2)}, {"step": 1})
    save_checkpoint(path, {"w": torch.full((2,), 2.0)}, {"step": 2})
    assert load_checkpoint(path).step == 2

    import metarestore.checkpoint as module

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_file", explode)
    with pytest.raises(OSError):
        save_checkpoint(path, {"w": torch.zeros(2)}, {"step": 3})
    ck = load_checkpoint(path)
    assert ck.step == 2 and torch.equal(ck.model["w"], torch.full((2,), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"], "no temporary directories left behind"


def test_keep_last_k(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path / f"step-{step:06d}", {"w": torch.ones(1)}, {"step": step})
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000030", "step-000040"]


def test_a_run_resumed_after_its_last_step_reports_its_final_validation_again(workdir):
    """A trial killed after its last checkpoint but before Tune recorded its result resumes at the last step:
    it trains nothing and reports its final validation again (Tune needs the objective in a result)."""
    from conftest import smoke_config
    from metarestore.engine import MetaTrainer
    from metarestore.loop import LoopHooks, run_loop

    cfg = smoke_config(workdir / "out", "train.steps=2", "train.val_every=2", "train.checkpoint_every=2")
    trainer = MetaTrainer(cfg, device="cpu")
    first = run_loop(trainer, LoopHooks(chief=True), progress=False)
    assert trainer.step == 2 and "val/psnr_adapted" in first
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for chief in (True, False):
        reports = []
        metrics = run_loop(trainer, LoopHooks(chief=chief, report=lambda *r, into=reports: into.append(r)), progress=False)
        assert trainer.step == 2 and all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
        [(step, reported, checkpoint)] = reports
        assert step == 2 and checkpoint is None
        if chief:
            assert metrics == first and reported == {"step": 2.0, **first}
        else:
            assert metrics == {} and reported == {}
