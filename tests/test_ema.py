"""``train.ema_decay``: a run validates, checkpoints and ships the moving average of its weights, trains on
with its live weights, and resumes both exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import smoke_config
from metarestore.checkpoint import load_checkpoint
from metarestore.config import ConfigError
from metarestore.engine import LIVE, MetaTrainer
from metarestore.loop import write_checkpoint


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_average_follows_the_live_weights_with_a_warmed_up_decay(tmp_path):
    trainer = MetaTrainer(smoke_config(tmp_path, "train.ema_decay=0.5"), device="cpu")
    expected = snapshot(trainer.model)
    for n in range(3):
        trainer.run_step()
        d = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.18, 0.25: the warm-up, below the decay asked for
        live = snapshot(trainer.model)
        expected = {k: d * expected[k] + (1 - d) * live[k] for k in live}
    for k, value in trainer.ema.average.items():
        torch.testing.assert_close(value, expected[k])
    assert any(not torch.equal(trainer.ema.average[k], live[k]) for k in live), "the average is not the weights"


def test_the_checkpoint_holds_the_average_as_its_model_and_the_live_weights_to_train_on(tmp_path):
    trainer = MetaTrainer(smoke_config(tmp_path, "train.ema_decay=0.9", "val.images=1", "val.shots=1"), device="cpu")
    trainer.run_step()
    trainer.run_step()
    live = snapshot(trainer.model)
    trainer.validate()  # validates the average ...
    assert all(torch.equal(v, live[k]) for k, v in trainer.model.state_dict().items()), "... and gives them back"
    ckpt = load_checkpoint(write_checkpoint(trainer, tmp_path / "ckpt", {}), training=True)
    assert all(torch.equal(ckpt.model[k], v) for k, v in trainer.ema.average.items())
    assert all(torch.equal(ckpt.training_tensors[f"{LIVE}{k}"], v) for k, v in live.items())
    assert ckpt.training_state["ema"] == {"decay": 0.9, "updates": 2}


def test_a_resumed_run_continues_the_average_and_the_live_weights_exactly(tmp_path):
    cfg = smoke_config(tmp_path, "train.ema_decay=0.9")
    straight = MetaTrainer(cfg, device="cpu")
    for _ in range(4):
        straight.run_step()
    first = MetaTrainer(cfg, device="cpu")
    first.run_step()
    first.run_step()
    resumed = MetaTrainer(cfg, device="cpu")
    resumed.load_state(load_checkpoint(write_checkpoint(first, tmp_path / "ckpt", {}), training=True))
    resumed.run_step()
    resumed.run_step()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
        assert torch.equal(resumed.ema.average[k], straight.ema.average[k]), k
    assert resumed.ema.updates == 4


def test_a_run_without_an_average_resumes_into_one_that_starts_it_from_its_weights(tmp_path):
    plain = MetaTrainer(smoke_config(tmp_path / "a"), device="cpu")
    plain.run_step()
    ckpt = load_checkpoint(write_checkpoint(plain, tmp_path / "ckpt", {}), training=True)
    assert not any(k.startswith(LIVE) for k in ckpt.training_tensors) and "ema" not in ckpt.training_state
    averaged = MetaTrainer(smoke_config(tmp_path / "b", "train.ema_decay=0.999"), device="cpu")
    averaged.load_state(ckpt)
    assert averaged.ema.updates == 0 and averaged.step == 1
    for k, v in plain.model.state_dict().items():
        assert torch.equal(averaged.ema.average[k], v) and torch.equal(averaged.model.state_dict()[k], v)
    # and back: a run that drops the average trains on from the live weights, not from the average
    averaged.run_step()
    live = snapshot(averaged.model)
    dropped = MetaTrainer(smoke_config(tmp_path / "c"), device="cpu")
    dropped.load_state(load_checkpoint(write_checkpoint(averaged, tmp_path / "ckpt2", {}), training=True))
    assert all(torch.equal(dropped.model.state_dict()[k], v) for k, v in live.items())


@pytest.mark.parametrize("decay", ["1.0", "-0.1"])
def test_a_decay_outside_zero_to_one_is_refused(tmp_path, decay):
    with pytest.raises(ConfigError, match="train.ema_decay"):
        smoke_config(tmp_path, f"train.ema_decay={decay}")
