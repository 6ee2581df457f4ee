"""Adapter kinds (metarestore.model.kinds): each adapts what it claims and nothing else; LoRA starts at the
base model, learns, runs in the batched path, and is stored and restored as a small delta."""

import pytest
import torch
from test_meta import episode, tiny

from metarestore.data import EpisodeBatch
from metarestore.meta import adapt, adaptable_params, apply_delta, delta, forward_with
from metarestore.meta.losses import charbonnier
from metarestore.model import KINDS, adaptable_names, count_parameters, get_kind, param_group

# what each kind must change, written independently of the kinds' own code: (model) -> parameter names
CLAIMS = {
    "all": lambda m: {n for n, _ in m.named_parameters()},
    "decoder": lambda m: {n for n, _ in m.named_parameters() if n.startswith(("ups.", "decoders.", "ending."))},
    "norm_bias": lambda m: {n for n, _ in m.named_parameters() if ".norm" in n or n.endswith(".bias")},
    "film": lambda m: {n for n, _ in m.named_parameters() if n.endswith(("film_scale", "film_shift"))},
    "lora": lambda m: {f"{n}.weight" for n, c in m.named_modules()
                       if isinstance(c, torch.nn.Conv2d) and c.kernel_size == (1, 1) and c.groups == 1},
}


def test_every_registered_kind_has_a_claim():
    assert set(CLAIMS) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(CLAIMS))
def test_each_kind_adapts_what_it_claims_and_nothing_else(kind):
    model, ep = tiny(kind), episode(size=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = adapt(model, ep.support_x, ep.support_y, steps=2, lrs={"default": 0.05},
                  params=adaptable_params(model, detach=True), loss_fn=charbonnier, first_order=True)
    assert list(state) == adaptable_names(model)
    effective = {**before, **get_kind(kind).parameters(model, state)}
    changed = {n for n, p in effective.items() if not torch.equal(p.detach(), before[n])}
    claimed = CLAIMS[kind](model)
    assert claimed and changed == claimed
    for n, p in model.named_parameters():  # the module itself is untouched
        assert torch.equal(p, before[n])


def test_lora_starts_at_the_base_model_and_lives_outside_it():
    from metarestore.hub import load_model

    learner = load_model("builtin:base")[0]  # the shipped weights, loaded as they are
    x = episode(size=32, dtype=torch.float32).support_x
    state = adaptable_params(learner.model, "lora", detach=True)
    assert not set(state) & set(learner.model.state_dict())
    assert all(n.endswith((".lora_a", ".lora_b")) for n in state)
    groups = {param_group(n) for n in state}
    assert groups <= set(learner.inner_lrs()), "every LoRA factor has a learning-rate group"
    base, start = learner.restore(x), learner.restore(x, state, kind="lora")
    assert float((start - base).abs().max()) <= 1e-6
    total, lora = count_parameters(learner.model, "lora")
    assert 0 < lora < total / 10  # a small delta


def test_lora_lowers_the_support_loss():
    model, ep = tiny("lora"), episode(size=16)
    start = initial = adaptable_params(model, detach=True)
    before = float(charbonnier(forward_with(model, start, ep.support_x), ep.support_y).detach())
    losses = []
    for _ in range(5):  # the 1x1 convolutions sit behind the blocks' near-zero beta/gamma: a large rate
        start = adapt(model, ep.support_x, ep.support_y, steps=1, lrs={"default": 0.5}, params=start,
                      loss_fn=charbonnier, first_order=True)
        losses.append(float(charbonnier(forward_with(model, start, ep.support_x), ep.support_y).detach()))
    assert all(b < a for a, b in zip([before, *losses], losses, strict=False))
    assert losses[-1] < 0.995 * before
    state = start
    assert any(not torch.equal(state[n], initial[n]) for n in state if n.endswith(".lora_a"))  # A learns too


@pytest.mark.parametrize("kind", ["film", "lora"])
def test_batched_adapt_equals_adapting_each_task(kind):
    model = tiny(kind)
    episodes = [episode(seed) for seed in range(3)]
    batch = EpisodeBatch.stack(episodes)
    start = adaptable_params(model, detach=True)
    together = adapt(model, batch.support_x, batch.support_y, steps=2, lrs={"default": 0.05},
                     params={n: p.expand(3, *p.shape) for n, p in start.items()}, loss_fn=charbonnier,
                     first_order=True)
    for t, ep in enumerate(episodes):
        alone = adapt(model, ep.support_x, ep.support_y, steps=2, lrs={"default": 0.05}, params=start,
                      loss_fn=charbonnier, first_order=True)
        for name in alone:
            torch.testing.assert_close(together[name][t], alone[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["film", "lora", "decoder"])
def test_a_stored_delta_gives_back_the_adapted_state(kind):
    model, ep = tiny(kind), episode()
    state = adapt(model, ep.support_x, ep.support_y, steps=2, lrs={"default": 0.05},
                  params=adaptable_params(model, detach=True), loss_fn=charbonnier, first_order=True)
    stored = delta(model, state)
    assert all(v.device.type == "cpu" and not v.requires_grad for v in stored.values())
    back = apply_delta(model, stored)
    torch.testing.assert_close(forward_with(model, back, ep.query_x), forward_with(model, state, ep.query_x),
                               rtol=1e-9, atol=1e-12)


def test_a_kind_rejects_a_state_of_another_model():
    small, other = tiny("lora"), tiny("lora")
    state = adaptable_params(small, detach=True)
    get_kind("lora").check(other, state)  # same architecture: fits
    with pytest.raises(ValueError):
        get_kind("lora").check(other, {n: v for n, v in list(state.items())[1:]})
    with pytest.raises(ValueError):
        get_kind("film").check(other, state)
    with pytest.raises(ValueError, match="unknown adapter kind 'prompt'.*lora"):
        get_kind("prompt")
