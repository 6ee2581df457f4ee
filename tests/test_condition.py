"""Degradation-aware conditioning (model.condition: degradation): it starts as a no-op, takes an unconditioned
model's weights and training state, and learns (its gradients reach the encoder)."""

from __future__ import annotations

import pytest
import torch

from conftest import smoke_config
from metarestore.checkpoint import Checkpoint
from metarestore.engine import MetaTrainer, plan_step
from metarestore.meta import adaptable_params, forward_with
from metarestore.model import RestorationNet
from metarestore.model.condition import PREFIX
from metarestore.model.network import load_weights

SHAPE = {"width": 4, "enc_blocks": (1, 2), "middle_blocks": 1, "dec_blocks": (1, 1), "adapt": "film"}


def pair(seed: int = 0) -> tuple[RestorationNet, RestorationNet]:
    """An unconditioned network with non-trivial weights and a conditioned one loaded from it."""
    torch.manual_seed(seed)
    plain = RestorationNet(**SHAPE)
    with torch.no_grad():  # leave the identity start so that the output depends on every block
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    conditioned = RestorationNet(**SHAPE, condition="degradation")
    fresh = load_weights(conditioned, plain.state_dict())
    assert fresh and all(n.startswith(PREFIX) for n in fresh)
    return plain, conditioned


@pytest.mark.parametrize("size", [(16, 16), (13, 22), (1, 5)])
def test_a_conditioned_network_starts_equal_to_the_unconditioned_one(size):
    plain, conditioned = pair()
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = plain(x)
        assert not torch.allclose(expected, x), "the weights are not the identity"
        torch.testing.assert_close(conditioned(x), expected, rtol=0, atol=0)
    # the functional path adapt() and training use, with per-task parameters under vmap
    tasks = x.expand(3, *x.shape)
    film = {n: p.expand(3, *p.shape) for n, p in adaptable_params(conditioned).items()}
    # (to float rounding: under vmap the layer norm takes its textbook form, the plain forward the fused one)
    torch.testing.assert_close(forward_with(conditioned, film, tasks), expected.expand_as(tasks), rtol=0, atol=1e-6)


def test_the_modulation_depends_on_the_image_once_trained():
    _, conditioned = pair()
    with torch.no_grad():
        for m in conditioned.condition.modulations:
            m.weight.normal_(0, 0.5)
    a, b = torch.rand(2, 1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    out_a, out_b = conditioned(torch.cat([a, b])), torch.cat([conditioned(a), conditioned(b)])
    torch.testing.assert_close(out_a, out_b)  # per image: one image's embedding does not leak into another's
    plain_weights = {k: v for k, v in conditioned.state_dict().items() if not k.startswith(PREFIX)}
    plain = RestorationNet(**SHAPE)
    plain.load_state_dict(plain_weights)
    with torch.no_grad():
        assert not torch.allclose(conditioned(a), plain(a), atol=1e-4)


def test_loading_stays_strict_outside_the_conditioning():
    plain, conditioned = pair()
    with pytest.raises(RuntimeError, match="Unexpected key"):  # a conditioned checkpoint in a plain network
        load_weights(RestorationNet(**SHAPE), conditioned.state_dict())
    partial = {k: v for k, v in conditioned.state_dict().items() if not k.startswith(f"{PREFIX}encoder")}
    with pytest.raises(RuntimeError, match="Missing key"):  # half a conditioning is not a fresh one
        load_weights(RestorationNet(**SHAPE, condition="degradation"), partial)
    broken = dict(plain.state_dict())
    broken.pop("intro.weight")
    with pytest.raises(RuntimeError, match="intro.weight"):
        load_weights(RestorationNet(**SHAPE, condition="degradation"), broken)


def test_a_conditioned_run_resumes_an_unconditioned_one_and_trains_its_encoder(tmp_path):
    two = "families.train=[gaussian_noise, jpeg]"  # a quicker step
    plain = MetaTrainer(smoke_config(tmp_path / "plain", two), device="cpu")
    plain.run_step()
    tensors, state = plain.training_state()
    saved = Checkpoint({}, {k: v.clone() for k, v in plain.model.state_dict().items()}, tensors, state)

    trainer = MetaTrainer(smoke_config(tmp_path / "cond", two, "model.condition=degradation"), device="cpu")
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.startswith(PREFIX)}
    trainer.load_state(saved)
    assert trainer.step == plain.step == 1
    for name, value in plain.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], value)
    for name, value in initial.items():
        assert torch.equal(dict(trainer.model.named_parameters())[name], value)
    # AdamW moments carry over for the network's parameters; the conditioning's start fresh
    moments = {id(p): s for p, s in trainer.optimizer.state.items()}
    before = dict(plain.model.named_parameters())
    for name, p in trainer.model.named_parameters():
        if name.startswith(PREFIX):
            assert id(p) not in moments
        else:
            assert torch.equal(moments[id(p)]["exp_avg"], plain.optimizer.state[before[name]]["exp_avg"])

    grads = {}
    for step in range(2):
        trainer.run_step()
        grads[step] = {n: p.grad.abs().sum().item() for n, p in trainer.model.named_parameters()
                       if n.startswith(PREFIX)}
    modulation = [n for n in grads[0] if ".modulations." in n]
    encoder = [n for n in grads[0] if ".encoder." in n]
    assert all(grads[0][n] > 0 for n in modulation), "the zero maps learn from the first step"
    assert all(grads[0][n] == 0 for n in encoder), "behind zero maps the encoder has no gradient yet"
    assert all(grads[1][n] > 0 for n in encoder), "after one step the gradients reach the encoder"


def test_a_fine_tune_may_add_the_conditioning_to_an_unconditioned_model(perturbed_smoke_checkpoint, tmp_path):
    from metarestore.checkpoint import load_checkpoint

    cfg = smoke_config(tmp_path / "run", "model.width=4", f"train.init={perturbed_smoke_checkpoint}",
                       "model.condition=degradation")
    trainer = MetaTrainer(cfg, device="cpu")
    assert cfg.model.width == 8 and cfg.model.condition == "degradation"  # the model's shape, plus conditioning
    source = load_checkpoint(perturbed_smoke_checkpoint).model
    own = trainer.model.state_dict()
    assert set(own) - set(source) == {k for k in own if k.startswith(PREFIX)} != set()
    assert all(torch.equal(own[k], v) for k, v in source.items())


# model.condition: family -------------------------------------------------------------------------------------
FAMILIES = ("gaussian_noise", "jpeg")


def told_pair(seed: int = 0) -> tuple[RestorationNet, RestorationNet]:
    """An unconditioned network with non-trivial weights and a family-conditioned one loaded from it."""
    plain, _ = pair(seed)
    told = RestorationNet(**SHAPE, condition="family", hint_families=FAMILIES)
    assert load_weights(told, plain.state_dict()) == ["condition.table"]
    return plain, told


def test_a_family_conditioned_network_starts_equal_to_the_unconditioned_one_told_or_blind():
    plain, told = told_pair()
    x = torch.rand(3, 3, 13, 22, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = plain(x)
        torch.testing.assert_close(told(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(told(x, torch.tensor(2)), expected, rtol=0, atol=0)


def test_each_image_gets_its_own_familys_row_and_the_rows_differ_once_trained():
    _, told = told_pair()
    with torch.no_grad():
        told.condition.table.normal_(0, 0.1)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([0, 1, 2])
    with torch.no_grad():
        together = told(x, rows)
        for i in range(3):  # one image's hint does not leak into another's
            torch.testing.assert_close(together[i:i + 1], told(x[i:i + 1], rows[i]))
        assert not torch.allclose(told(x[:1], torch.tensor(1)), told(x[:1], torch.tensor(2)), atol=1e-4)
        torch.testing.assert_close(told(x), told(x, torch.tensor(0)))  # no hint = the blind row


def test_naming_a_family_the_model_cannot_be_told_says_what_it_knows():
    from metarestore.config import MetaConfig
    from metarestore.meta import make_learner

    plain, told = told_pair()
    learner = make_learner(told, MetaConfig(algorithm="multitask"))
    x = torch.rand(1, 3, 16, 16)
    assert learner.hint("jpeg").item() == 2 and learner.hint(None) is None
    with pytest.raises(ValueError, match="gaussian_noise, jpeg"):
        learner.restore(x, family="haze")
    with pytest.raises(ValueError, match="blind"):
        make_learner(plain, MetaConfig(algorithm="multitask")).restore(x, family="jpeg")


def test_a_family_conditioned_run_resumes_an_unconditioned_one_and_trains_the_named_rows(tmp_path):
    two = "families.train=[gaussian_noise, jpeg]"
    plain = MetaTrainer(smoke_config(tmp_path / "plain", two), device="cpu")
    plain.run_step()
    tensors, state = plain.training_state()
    saved = Checkpoint({}, {k: v.clone() for k, v in plain.model.state_dict().items()}, tensors, state)
    trainer = MetaTrainer(smoke_config(tmp_path / "told", two, "model.condition=family", "meta.blind_fraction=0"),
                          device="cpu")
    assert trainer.cfg.model.hint_families == ["gaussian_noise", "jpeg"]  # default: the training families
    trainer.load_state(saved)
    trainer.run_step()
    table = trainer.model.condition.table
    assert table.grad[1:].abs().sum(1).gt(0).all(), "every named row learns"
    assert table.grad[0].abs().sum() == 0, "with blind_fraction 0 the blind row gets nothing"
    assert table.abs().sum() > 0


def test_a_fine_tune_of_a_told_model_keeps_what_it_can_be_told(told_checkpoint, tmp_path):
    """Fine-tuning a told model on other families: its table (and the families it names) stay the saved
    ones, every weight loads, and a task of a family it cannot be told trains blind."""
    from metarestore.checkpoint import load_checkpoint

    for condition in ("none", "family"):
        cfg = smoke_config(tmp_path / condition, f"train.init={told_checkpoint}", f"model.condition={condition}",
                           "families.train=[gaussian_noise, color_cast]", "families.held_out=[haze]")
        trainer = MetaTrainer(cfg, device="cpu")
        assert cfg.model.condition == "family"
        assert cfg.model.hint_families == ["gaussian_noise", "gaussian_blur", "jpeg", "low_light", "awgn"]
        source = load_checkpoint(told_checkpoint).model
        assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in source.items())
        cast = [t for t in plan_step(cfg, 0) if t.family == "color_cast"]
        assert trainer.learner.hints(cast).tolist() == [0]
        trainer.run_step()


def test_a_fine_tune_teaches_new_told_rows_alone_and_leaves_the_rest_bit_for_bit(told_checkpoint, tmp_path):
    """``train.trainable: [condition.]`` with a chain appended to the told families (configs/base-chains.yaml):
    the chain's row starts as the blind row and learns; the network and every saved row stay as they were,
    so whatever the model was told before it still restores exactly as before."""
    from metarestore.checkpoint import load_checkpoint
    from metarestore.errors import UserError

    told = ["gaussian_noise", "gaussian_blur", "jpeg", "low_light", "awgn"]
    cfg = smoke_config(tmp_path / "run", f"train.init={told_checkpoint}", "families.train=[gaussian_noise+jpeg]",
                       f"model.hint_families=[{', '.join(told)}, gaussian_noise+jpeg]", "train.trainable=[condition.]",
                       "model.condition=family", "meta.algorithm=multitask", "meta.blind_fraction=0")
    trainer = MetaTrainer(cfg, device="cpu")
    assert trainer.model.hint_families == (*told, "gaussian_noise+jpeg")
    source = load_checkpoint(told_checkpoint).model
    table = trainer.model.state_dict()["condition.table"].clone()
    torch.testing.assert_close(table[-1], source["condition.table"][0], rtol=0, atol=0)  # starts as the blind row
    assert [p for p in trainer.params] == [trainer.model.condition.table]
    for _ in range(2):
        trainer.run_step()
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in source.items() if k != "condition.table")
    torch.testing.assert_close(after["condition.table"][:-1], source["condition.table"], rtol=0, atol=0)
    assert not torch.equal(after["condition.table"][-1], table[-1])
    with pytest.raises(UserError, match="train.trainable"):
        MetaTrainer(smoke_config(tmp_path / "bad", "train.trainable=[nothing.]"), device="cpu")
