"""The shipped model (builtin:NAME), fine-tuning from a model (train.init) and resuming from a copied
checkpoint (--resume-from): what lets a user restore on install and a long training span machines."""

from __future__ import annotations

import shutil

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import smoke_config
from metarestore.checkpoint import list_checkpoints, load_checkpoint, publish
from metarestore.engine import MetaTrainer
from metarestore.hub import DEFAULT_MODEL, ModelNotFoundError, builtin_names, load_model, resolve
from metarestore.model import kind_of
from metarestore.train_local import train_local


def test_an_unknown_builtin_model_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="no built-in model 'builtin:nope'"):
        resolve("builtin:nope")
    with pytest.raises(ModelNotFoundError):
        resolve("builtin:../weights")


@pytest.mark.skipif("base" not in builtin_names(), reason="no base model shipped in this checkout")
def test_the_shipped_model_loads_by_default_and_restores():
    learner, metadata, ref = load_model(DEFAULT_MODEL)
    assert ref.name == "builtin:base" and metadata["step"] > 0
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(1, 3, 48, 64, generator=g)
    out = learner.restore(clean + 0.1 * torch.randn(clean.shape, generator=g))
    assert out.shape == clean.shape and torch.isfinite(out).all()
    for family in learner.hint_families:  # a model that can be told the degradation
        told = learner.restore(clean, family=family)
        assert told.shape == clean.shape and torch.isfinite(told).all()


def test_init_fine_tunes_from_a_model_and_takes_its_network_shape(perturbed_smoke_checkpoint, tmp_path):
    cfg = smoke_config(tmp_path / "run", "model.width=4", "model.adapt=lora", f"train.init={perturbed_smoke_checkpoint}")
    trainer = MetaTrainer(cfg, device="cpu")
    source = load_checkpoint(perturbed_smoke_checkpoint).model
    assert cfg.model.width == 8  # the smoke network's, not the width asked for
    # the adapter kind is the config's (it picks what the inner loop adapts, not the network's shape)
    assert cfg.model.adapt == "lora" and kind_of(trainer.model).name == "lora"
    assert load_checkpoint(perturbed_smoke_checkpoint).metadata["config"]["model"]["adapt"] == "film"
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, source[name], rtol=0, atol=0)
    assert trainer.step == 0


def test_resume_from_a_copied_checkpoint_continues_its_steps(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = smoke_config(tmp_path / "a", "train.steps=4", "train.checkpoint_every=2", "train.val_every=4")
    train_local(first, tracking_uri=uri, progress=False, register=False)
    copied = tmp_path / "committed"
    shutil.copytree(list_checkpoints(tmp_path / "a" / "checkpoints")[-1], copied)  # step 4, as if from git
    longer = smoke_config(tmp_path / "b", "train.steps=6", "train.checkpoint_every=2", "train.val_every=6")
    info = train_local(longer, tracking_uri=uri, progress=False, register=False, resume_from=copied)
    assert load_checkpoint(info["checkpoint"]).step == 6
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-000006"]


def test_publish_keeps_weights_and_drops_training_state(perturbed_smoke_checkpoint, tmp_path):
    published = publish(perturbed_smoke_checkpoint, tmp_path / "weights" / "x")
    assert sorted(p.name for p in published.iterdir()) == ["metadata.json", "model.safetensors"]
    a, b = load_checkpoint(published).model, load_checkpoint(perturbed_smoke_checkpoint).model
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_resumed_learner_gets_its_whole_state_back(tmp_path):
    """Meta-SGD's learned inner rates travel with the training state as the learner's ``state_dict`` (no
    ``model.`` part); a checkpoint of another algorithm's state is refused rather than half-loaded."""
    from metarestore.checkpoint import Checkpoint
    from metarestore.errors import ResumeError

    cfg = smoke_config(tmp_path / "run", "meta.algorithm=metasgd")
    trainer = MetaTrainer(cfg, device="cpu")
    trainer.run_step()
    trainer.run_step()
    tensors, state = trainer.training_state()
    learned = trainer.learner.inner_lr_values()
    assert learned != MetaTrainer(cfg, device="cpu").learner.inner_lr_values(), "two steps move the rates"
    assert {k for k in tensors if k.startswith("learner.")} == {f"learner.log_lr.{g}" for g in learned}
    saved = Checkpoint({}, {k: v.clone() for k, v in trainer.model.state_dict().items()}, tensors, state)
    resumed = MetaTrainer(cfg, device="cpu")
    resumed.load_state(saved)
    assert resumed.learner.inner_lr_values() == learned and resumed.step == trainer.step
    fomaml = MetaTrainer(smoke_config(tmp_path / "other", "meta.algorithm=fomaml"), device="cpu")
    with pytest.raises(ResumeError, match="learner state"):
        fomaml.load_state(saved)


def test_meta_sgd_on_a_frozen_network_ships_its_rates_and_nothing_else(tmp_path):
    """``configs/meta-sgd.yaml``'s recipe on the smoke model: the rates (one per adapted number and step) move,
    travel in the model file under ``learner.`` and come back with ``load_model``, and adapt with them; the
    network the run started from is what it ships, bit for bit."""
    cfg = smoke_config(tmp_path / "run", "meta.algorithm=metasgd", "meta.rates=parameter", "meta.first_order=true",
                       "model.adapt=decoder",  # a fresh FiLM has no gradient yet (NAFNet blocks start as identity)
                       "meta.inner_steps=2", "meta.zero_shot_weight=0", "train.trainable=[log_rates]",
                       "train.steps=2", "train.outer_lr=0.1", "train.val_every=2", "train.checkpoint_every=2")
    start = MetaTrainer(cfg, device="cpu").learner
    info = train_local(cfg, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", progress=False, register=False)
    learner, metadata, _ = load_model(info["checkpoint"])
    assert set(load_checkpoint(info["checkpoint"]).model) - set(start.model.state_dict()) == {"learner.log_rates"}
    for name, value in start.model.state_dict().items():
        assert torch.equal(learner.model.state_dict()[name], value), name
    assert learner.log_rates.shape == (2, kind_of(learner.model).count(learner.model))
    assert not torch.equal(learner.log_rates, start.log_rates), "two steps move the rates"
    assert set(metadata["inner_lr"]) == set(learner.groups)
    x = torch.rand(2, 3, 16, 16)
    y = (x + 0.1).clamp(0, 1)
    with torch.no_grad():
        learner.log_rates.copy_(start.log_rates)
    before = learner.adapt(x, y, steps=2)
    learner.load_weights(load_checkpoint(info["checkpoint"]).model)
    after = learner.adapt(x, y, steps=2)
    assert any(not torch.equal(before[n], after[n]) for n in after), "adaptation uses the learned rates"


def test_resume_against_a_store_without_the_recorded_run_logs_to_a_new_run(tmp_path, capsys):
    """A checkpoint carries its MLflow run id; resumed on another machine (or with another --tracking-uri)
    that run is not there: training goes on in a new run and says so, instead of an MLflow traceback."""
    first = smoke_config(tmp_path, "train.steps=2", "train.checkpoint_every=2", "train.val_every=2")
    old = train_local(first, tracking_uri=f"sqlite:///{tmp_path / 'a.db'}", progress=False, register=False)
    longer = smoke_config(tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.val_every=4")
    new = train_local(longer, tracking_uri=f"sqlite:///{tmp_path / 'b.db'}", progress=False, register=False,
                      resume=True)
    assert f"note: MLflow run {old['run_id']} is not in" in capsys.readouterr().out
    assert new["run_id"] != old["run_id"] and load_checkpoint(new["checkpoint"]).step == 4
    data = MlflowClient(new["tracking_uri"]).get_run(new["run_id"]).data
    assert "meta_loss" in data.metrics and data.params["precision"] == "fp32"  # a new run gets its parameters


def test_a_relative_init_folder_is_made_absolute_for_the_ray_workers(tmp_path, monkeypatch):
    """Ray Train workers run in directories of their own: a config's ``train.init`` folder, relative to where
    ``metarestore train`` ran, is made absolute with the data folders; model URIs pass as they are."""
    from training.driver import absolute_paths

    (tmp_path / "checkpoints" / "start").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    made = absolute_paths(smoke_config(tmp_path / "run", "train.init=checkpoints/start"))
    assert made.train.init == str(tmp_path / "checkpoints" / "start")
    for uri in ("builtin:base", "models:/metarestore@latest"):
        assert absolute_paths(smoke_config(tmp_path / "run", f"train.init={uri}")).train.init == uri
