"""The one few-shot protocol (metarestore.fewshot): its noise rule, and adapt-then-restore with scores."""

from __future__ import annotations

import torch

from metarestore.config import MetaConfig
from metarestore.fewshot import Task, few_shot
from metarestore.meta import MetaLearner, make_learner
from metarestore.model import RestorationNet


def tiny_learner(steps: int = 5) -> MetaLearner:
    torch.manual_seed(0)
    model = RestorationNet(width=4, enc_blocks=(1,), middle_blocks=1, dec_blocks=(1,), adapt="decoder")
    return make_learner(model, MetaConfig(algorithm="fomaml", inner_steps=steps, inner_lr={"default": 0.05})).eval()


def test_support_shares_the_task_but_not_its_noise():
    task = Task.sample("gaussian_noise", 0.6, 0, "some", "task")
    assert task == Task.sample("gaussian_noise", 0.6, 0, "some", "task")  # stable_seed: the same draw
    assert task.params != Task.sample("gaussian_noise", 0.6, 1, "some", "task").params
    clean = torch.full((1, 3, 32, 32), 0.5)
    query, again, support = task.degrade(clean), task.degrade(clean), task.degrade_support(clean)
    assert torch.equal(query, again)  # the query is the task as drawn
    assert not torch.equal(query, support)  # the support: fresh noise ...
    noise_q, noise_s = (query - clean).std(), (support - clean).std()
    assert abs(float(noise_q - noise_s)) < 0.2 * float(noise_q)  # ... of the same strength


def test_few_shot_adapts_on_the_support_and_scores_the_query():
    learner = tiny_learner()
    task = Task.sample("gaussian_noise", 0.5, 0, "test")
    g = torch.Generator().manual_seed(0)
    support_y, query_y = torch.rand(4, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    support, query_x = (task.degrade_support(support_y), support_y), task.degrade(query_y)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}

    run = few_shot(learner, query_x, support, steps=5, query_y=query_y)
    assert set(run.scores) == {"input", "zero_shot", "adapted"} and run.params is not None
    assert torch.equal(run.zero_shot, learner.restore(query_x))
    assert not torch.equal(run.adapted, run.zero_shot)
    assert all(torch.equal(p, before[n]) for n, p in learner.model.named_parameters())  # the model untouched

    unadapted = few_shot(learner, query_x, support, steps=0, query_y=query_y)
    assert unadapted.scores["adapted"] == unadapted.scores["zero_shot"]  # 0 steps: the zero-shot model
    only = few_shot(learner, query_x)
    assert only.adapted is None and only.scores == {} and torch.equal(only.zero_shot, run.zero_shot)
    seen = []
    few_shot(learner, query_x, support, steps=1, zero_shot=False,
             restore=lambda lrn, x, params: seen.append(params) or lrn.restore(x, params))
    assert len(seen) == 1 and seen[0] is not None  # a custom restore (e.g. tiled) gets the adapted params
