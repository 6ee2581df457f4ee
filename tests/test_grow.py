"""Growing a network mid-run: a deeper model (more blocks at the end of its stages) takes a shallower one's
weights and training state and computes the same function until it trains."""

from __future__ import annotations

import pytest
import torch

from conftest import smoke_config
from metarestore.checkpoint import Checkpoint
from metarestore.engine import MetaTrainer
from metarestore.errors import ResumeError
from metarestore.model import RestorationNet
from metarestore.model.condition import PREFIX
from metarestore.model.network import load_weights

SHALLOW = {"width": 4, "enc_blocks": (1, 2), "middle_blocks": 1, "dec_blocks": (1, 1), "adapt": "film"}
DEEP = {**SHALLOW, "enc_blocks": (2, 2), "middle_blocks": 2, "dec_blocks": (1, 3)}
NEW_BLOCKS = ("encoders.0.1.", "middle.1.", "decoders.1.1.", "decoders.1.2.")
FAMILIES = ("gaussian_noise", "jpeg")


def perturbed(**kwargs) -> RestorationNet:
    """A network whose every parameter (its conditioning's too) is off its initial value."""
    torch.manual_seed(0)
    net = RestorationNet(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("condition", ["none", "family", "degradation"])
def test_a_grown_network_computes_what_the_shallow_one_did(condition):
    told = {"condition": condition, "hint_families": FAMILIES if condition == "family" else ()}
    shallow, deep = perturbed(**SHALLOW, **told), RestorationNet(**DEEP, **told)
    fresh = load_weights(deep, shallow.state_dict())
    assert fresh and all(k.startswith(NEW_BLOCKS) or ".modulations." in k for k in fresh)
    assert {k for k in deep.state_dict() if k.startswith(NEW_BLOCKS)} <= set(fresh)
    x = torch.rand(2, 3, 13, 22, generator=torch.Generator().manual_seed(1))
    hints = [None] + ([deep.condition.hints(["jpeg", "gaussian_noise"])] if condition == "family" else [])
    with torch.no_grad():
        for hint in hints:
            expected = shallow(x, hint) if hint is not None else shallow(x)
            assert not torch.allclose(expected, x), "the weights are not the identity"
            got = deep(x, hint) if hint is not None else deep(x)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        deep.middle[1].beta.fill_(0.5)  # and the new blocks are real blocks, not dead weight
        assert not torch.allclose(deep(x), shallow(x), atol=1e-4)


def test_growing_stays_strict_otherwise():
    deep = perturbed(**DEEP)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # a network does not shrink
        load_weights(RestorationNet(**SHALLOW), deep.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):  # nor change its width
        load_weights(RestorationNet(**{**DEEP, "width": 8}), perturbed(**SHALLOW).state_dict())
    partial = dict(deep.state_dict())
    partial.pop("encoders.0.1.conv1.weight")  # half a block is not a new one
    with pytest.raises(RuntimeError, match="encoders.0.1.conv1.weight"):
        load_weights(RestorationNet(**DEEP), partial)


def test_a_told_run_resumes_into_a_deeper_network_and_trains_its_new_blocks(tmp_path):
    two = ("families.train=[gaussian_noise, jpeg]", "model.condition=family")  # a quicker step, told
    shallow = MetaTrainer(smoke_config(tmp_path / "shallow", *two), device="cpu")
    shallow.run_step()
    tensors, state = shallow.training_state()
    saved = Checkpoint({}, {k: v.clone() for k, v in shallow.model.state_dict().items()}, tensors, state)

    cfg = smoke_config(tmp_path / "deep", *two)
    grow = [f"model.middle_blocks={cfg.model.middle_blocks + 1}",
            f"model.dec_blocks=[{', '.join(str(n + 1) for n in cfg.model.dec_blocks)}]"]
    trainer = MetaTrainer(smoke_config(tmp_path / "deep", *two, *grow), device="cpu")
    trainer.load_state(saved)
    assert trainer.step == shallow.step == 1
    own = dict(trainer.model.named_parameters())
    new = {n for n in own if n not in shallow.model.state_dict()}
    assert new and all(n.startswith(("middle.", "decoders.")) for n in new)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(x), shallow.model(x), rtol=0, atol=1e-6)
    # AdamW moments carry over for the old parameters; the new blocks and the grown table start fresh
    moments = {id(p): s for p, s in trainer.optimizer.state.items()}
    before = dict(shallow.model.named_parameters())
    for name, p in own.items():
        if name in new or name == f"{PREFIX}table":
            assert id(p) not in moments
        else:
            assert torch.equal(moments[id(p)]["exp_avg"], shallow.optimizer.state[before[name]]["exp_avg"])
    start = {n: own[n].detach().clone() for n in new}
    trainer.run_step()
    scales = [n for n in new if n.endswith((".beta", ".gamma"))]
    assert scales and all(not torch.equal(own[n], start[n]) for n in scales), "the new blocks learn"


def test_a_told_run_resumes_with_a_new_family_whose_row_starts_blind(tmp_path):
    """``families.train`` gains a family (``awgn``, say) mid-run: its told row starts as the blind row, the
    saved families' rows and every other weight carry over, and the grown table's moments start fresh."""
    two = ("families.train=[gaussian_noise, jpeg]", "model.condition=family")
    before = MetaTrainer(smoke_config(tmp_path / "two", *two), device="cpu")
    before.run_step()
    tensors, state = before.training_state()
    saved = Checkpoint({"config": before.cfg.to_dict()}, {k: v.clone() for k, v in before.model.state_dict().items()},
                       tensors, state)

    trainer = MetaTrainer(smoke_config(tmp_path / "three", "families.train=[gaussian_noise, jpeg, awgn]",
                                       "model.condition=family"), device="cpu")
    trainer.load_state(saved)
    model, old = trainer.model, before.model
    assert model.hint_families == ("gaussian_noise", "jpeg", "awgn") and trainer.step == 1
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for family in ("gaussian_noise", "jpeg"):
            torch.testing.assert_close(model(x, model.condition.hints([family])),
                                       old(x, old.condition.hints([family])), rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x, model.condition.hints(["awgn"])), old(x), rtol=0, atol=1e-6)
    table = model.condition.table
    assert table not in trainer.optimizer.state
    trainer.run_step()
    assert not torch.equal(table[3], table[0]), "the new family's row learns its own"

    reordered = MetaTrainer(smoke_config(tmp_path / "bad", "families.train=[jpeg, gaussian_noise, awgn]",
                                         "model.condition=family"), device="cpu")
    with pytest.raises(ResumeError, match="told gaussian_noise, jpeg"):
        reordered.load_state(saved)
