"""The meta-learning core: adapt(), the algorithms' gradients, task weights."""

import pytest
import torch

from metarestore.config import MetaConfig
from metarestore.data import Episode, EpisodeBatch, TaskSpec
from metarestore.meta import ALGORITHMS, adapt, adaptable_params, forward_with, make_learner
from metarestore.meta.losses import charbonnier
from metarestore.model import RestorationNet, adaptable_names


def tiny(adapt_mode="decoder", dtype=torch.float64):
    torch.manual_seed(0)
    model = RestorationNet(width=4, enc_blocks=(1,), middle_blocks=1, dec_blocks=(1,), adapt=adapt_mode)
    with torch.no_grad():  # leave the identity start so that every parameter has a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype)


def episode(seed=0, dtype=torch.float64, size=8):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(4, 3, size, size, generator=g, dtype=dtype)
    x = (y + 0.1 * torch.randn(y.shape, generator=g, dtype=dtype)).clamp(0, 1)
    return Episode(TaskSpec("gaussian_noise", 0.5, seed), {}, x[:2], y[:2], x[2:], y[2:])


def learner(model, algorithm, steps=2, lr=0.05, zero_shot_weight=0.0):
    cfg = MetaConfig(algorithm=algorithm, inner_steps=steps, inner_lr={"default": lr}, loss="charbonnier",
                     zero_shot_weight=zero_shot_weight)
    return make_learner(model, cfg).to(torch.float64)


def meta_objective(model, ep, steps, lr):
    fast = adapt(model, ep.support_x, ep.support_y, steps=steps, lrs={"default": lr}, loss_fn=charbonnier)
    return charbonnier(forward_with(model, fast, ep.query_x), ep.query_y)


def grads_of(module):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}


@pytest.mark.parametrize("mode", ["decoder", "all"])
def test_maml_meta_gradient_matches_finite_differences(mode):
    model, ep = tiny(mode), episode()
    lrn = learner(model, "maml")
    lrn.task_gradient(ep, scale=1.0)
    analytic = grads_of(model)
    g = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    eps = 1e-6

    def shifted(sign):
        with torch.no_grad():
            for n, p in params.items():
                p.add_(sign * eps * direction[n])
        value = float(meta_objective(model, ep, 2, 0.05).detach())
        with torch.no_grad():
            for n, p in params.items():
                p.sub_(sign * eps * direction[n])
        return value

    numeric = (shifted(+1) - shifted(-1)) / (2 * eps)
    predicted = sum(float((analytic[n] * direction[n]).sum()) for n in params)
    assert predicted == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_first_order_equals_maml_without_inner_jacobian():
    model, ep = tiny("decoder"), episode()
    learner(model, "fomaml").task_gradient(ep, scale=1.0)
    fomaml = grads_of(model)
    model.zero_grad(set_to_none=True)

    # reference: adapt on detached leaves, then the query gradient at the adapted point
    fast = adapt(model, ep.support_x, ep.support_y, steps=2, lrs={"default": 0.05},
                 params=adaptable_params(model, detach=True), loss_fn=charbonnier, first_order=True)
    fast = {n: p.detach().requires_grad_(True) for n, p in fast.items()}
    loss = charbonnier(forward_with(model, fast, ep.query_x), ep.query_y)
    frozen = {n: p for n, p in model.named_parameters() if n not in fast}
    grads = torch.autograd.grad(loss, [*fast.values(), *frozen.values()])
    reference = dict(zip([*fast, *frozen], grads, strict=True))
    for name in fomaml:
        torch.testing.assert_close(fomaml[name], reference[name], rtol=1e-9, atol=1e-12)

    model.zero_grad(set_to_none=True)
    learner(model, "maml").task_gradient(ep, scale=1.0)
    maml = grads_of(model)
    assert any(not torch.allclose(maml[n], fomaml[n], atol=1e-9) for n in maml), "second order must differ"


def test_metasgd_learning_rates_receive_gradients():
    model, ep = tiny("decoder"), episode()
    lrn = learner(model, "metasgd")
    assert set(lrn.log_lr.keys()) == {"decoder", "ending"}
    lrn.task_gradient(ep, scale=1.0)
    for group, p in lrn.log_lr.items():
        assert p.grad is not None and p.grad.abs() > 0, group


def test_adapt_lowers_support_loss_and_leaves_model_untouched():
    model, ep = tiny("decoder"), episode(size=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = adaptable_params(model, detach=True)
    start = float(charbonnier(forward_with(model, params, ep.support_x), ep.support_y))
    fast = adapt(model, ep.support_x, ep.support_y, steps=10, lrs={"default": 0.05}, params=params,
                 loss_fn=charbonnier, first_order=True)
    end = float(charbonnier(forward_with(model, fast, ep.support_x), ep.support_y))
    assert end < start
    assert set(fast) == set(adaptable_names(model))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_per_group_learning_rates_apply_per_group():
    model, ep = tiny("decoder"), episode()
    fast = adapt(model, ep.support_x, ep.support_y, steps=1, lrs={"default": 0.05, "ending": 0.0},
                 params=adaptable_params(model, detach=True), loss_fn=charbonnier, first_order=True)
    own = dict(model.named_parameters())
    assert torch.equal(fast["ending.weight"], own["ending.weight"])
    assert not torch.equal(fast["decoders.0.0.conv1.weight"], own["decoders.0.0.conv1.weight"])


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd", "reptile", "multitask"])
def test_zero_weight_family_contributes_nothing(algorithm):
    """Weighted meta-gradient with tasks {A (w=1), B (w=0)} equals the gradient of {A} alone."""
    model = tiny("decoder")
    lrn = learner(model, algorithm)
    a, b = episode(0), episode(1)
    lrn.task_gradient(a, scale=1.0 / 1.0)
    lrn.task_gradient(b, scale=0.0 / 1.0)
    with_b = grads_of(lrn)
    lrn.zero_grad(set_to_none=True)
    lrn.task_gradient(a, scale=1.0)
    alone = grads_of(lrn)
    for name in alone:
        torch.testing.assert_close(with_b[name], alone[name], rtol=0, atol=0)
    lrn.zero_grad(set_to_none=True)
    lrn.task_gradient(b, scale=1.0)
    assert any(v.abs().sum() > 0 for v in grads_of(lrn).values()), "family B does have a gradient of its own"


def test_reptile_direction_is_mean_inner_gradient_for_one_step():
    model, ep = tiny("all"), episode()
    lrn = learner(model, "reptile", steps=1, lr=0.05)
    lrn.task_gradient(ep, scale=1.0)
    reptile = grads_of(model)
    model.zero_grad(set_to_none=True)
    loss = charbonnier(model(ep.support_x), ep.support_y)
    support_grad = dict(zip([n for n, _ in model.named_parameters()],
                            torch.autograd.grad(loss, list(model.parameters())), strict=True))
    for name in reptile:
        torch.testing.assert_close(reptile[name], support_grad[name], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd"])
def test_zero_shot_term_adds_the_plain_query_gradient(algorithm):
    """w * grad L_q(theta) on top of the meta-gradient: the initialisation must also restore on its own."""
    model, ep = tiny("decoder"), episode()
    learner(model, algorithm, zero_shot_weight=0.5).task_gradient(ep, scale=1.0)
    combined = grads_of(model)
    model.zero_grad(set_to_none=True)
    learner(model, algorithm).task_gradient(ep, scale=1.0)
    meta_only = grads_of(model)
    model.zero_grad(set_to_none=True)
    zero_shot = torch.autograd.grad(charbonnier(model(ep.query_x), ep.query_y), list(model.parameters()))
    for (name, value), extra in zip(meta_only.items(), zero_shot, strict=True):
        torch.testing.assert_close(combined[name], value + 0.5 * extra, rtol=1e-7, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_adapt_on_cuda_matches_cpu():
    model, ep = tiny("decoder", torch.float32), episode(dtype=torch.float32)
    cpu = adapt(model, ep.support_x, ep.support_y, steps=3, lrs={"default": 0.05},
                params=adaptable_params(model, detach=True), first_order=True)
    model_cuda = model.cuda()
    gpu = adapt(model_cuda, ep.support_x.cuda(), ep.support_y.cuda(), steps=3, lrs={"default": 0.05},
                params=adaptable_params(model_cuda, detach=True), first_order=True)
    for name in cpu:
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["film", "decoder", "all"])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_batched_step_equals_per_task_gradients(algorithm, mode):
    """All tasks through the network at once (the training path) == one task at a time (the reference)."""
    model = tiny(mode)
    lrn = learner(model, algorithm, zero_shot_weight=0.7)
    episodes = [episode(seed) for seed in range(3)]
    scales = [0.5, 0.2, 0.3]
    expected_losses = [lrn.task_gradient(ep, scale) for ep, scale in zip(episodes, scales, strict=True)]
    per_task = grads_of(lrn)
    lrn.zero_grad(set_to_none=True)
    losses = lrn.batch_gradient(EpisodeBatch.stack(episodes), torch.tensor(scales, dtype=torch.float64))
    batched = grads_of(lrn)
    torch.testing.assert_close(losses, torch.tensor(expected_losses, dtype=torch.float64), rtol=1e-9, atol=0)
    for name, value in per_task.items():
        assert value.abs().sum() > 0 or algorithm == "reptile", f"{name} got no gradient"
        torch.testing.assert_close(batched[name], value, rtol=1e-5, atol=1e-12, msg=name)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_batched_step_equals_per_task_gradients_when_told_the_family(algorithm):
    """model.condition: family: each task its own row of the table (or the blind one), in both paths."""
    torch.manual_seed(0)
    model = RestorationNet(width=4, enc_blocks=(1,), middle_blocks=1, dec_blocks=(1,), condition="family",
                           hint_families=("gaussian_noise", "jpeg"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.to(torch.float64)
    cfg = MetaConfig(algorithm=algorithm, inner_steps=2, inner_lr={"default": 0.05}, loss="charbonnier",
                     zero_shot_weight=0.7, blind_fraction=0.5)
    lrn = make_learner(model, cfg).to(torch.float64)
    episodes = []
    for seed, family in zip([1, 2, 3, 0, 4], ["gaussian_noise", "jpeg", "jpeg", "gaussian_noise", "inpainting"],
                            strict=True):
        ep = episode(seed)
        episodes.append(Episode(TaskSpec(family, 0.5, seed), {}, ep.support_x, ep.support_y, ep.query_x, ep.query_y))
    hints = lrn.hints([ep.task for ep in episodes]).tolist()
    assert 0 in hints[:4] and len(set(hints)) == 3, hints  # named and blind tasks both present
    assert hints[4] == 0  # a family the model cannot be told trains blind
    scales = [0.3, 0.2, 0.2, 0.2, 0.1]
    expected_losses = [lrn.task_gradient(ep, scale) for ep, scale in zip(episodes, scales, strict=True)]
    per_task = grads_of(lrn)
    assert per_task["model.condition.table"].abs().sum() > 0 or algorithm == "reptile"
    lrn.zero_grad(set_to_none=True)
    losses = lrn.batch_gradient(EpisodeBatch.stack(episodes), torch.tensor(scales, dtype=torch.float64))
    batched = grads_of(lrn)
    torch.testing.assert_close(losses, torch.tensor(expected_losses, dtype=torch.float64), rtol=1e-9, atol=0)
    for name, value in per_task.items():
        torch.testing.assert_close(batched[name], value, rtol=1e-5, atol=1e-12, msg=name)


def test_batched_adapt_equals_adapting_each_task():
    model = tiny("film")
    episodes = [episode(seed) for seed in range(3)]
    batch = EpisodeBatch.stack(episodes)
    together = adapt(model, batch.support_x, batch.support_y, steps=3, lrs={"default": 0.05}, loss_fn=charbonnier,
                     first_order=True)
    for t, ep in enumerate(episodes):
        alone = adapt(model, ep.support_x, ep.support_y, steps=3, lrs={"default": 0.05}, loss_fn=charbonnier,
                      first_order=True)
        for name in alone:
            torch.testing.assert_close(together[name][t], alone[name], rtol=1e-9, atol=1e-12)


def test_a_step_in_chunks_equals_the_step_in_one_batch(tmp_path):
    """train.max_batch_patches splits a step's tasks into chunks; the accumulated update is the same."""
    from conftest import smoke_config
    from metarestore.engine import MetaTrainer

    results = []
    for patches in (1000, 4):  # one batch of all tasks; one task (2 + 2 patches) per chunk
        trainer = MetaTrainer(smoke_config(tmp_path, f"train.max_batch_patches={patches}"), device="cpu")
        metrics = trainer.run_step()
        results.append((metrics, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
    (one, weights_one), (chunked, weights_chunked) = results
    assert one["meta_loss"] == pytest.approx(chunked["meta_loss"], rel=1e-5)
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_chunked[name], value, rtol=1e-4, atol=1e-6)


def test_auto_precision_is_bf16_only_on_a_cpu_with_bf16_units():
    from metarestore.engine import cpu_has_bf16_units, resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_bf16_units() else "fp32")
    assert resolve_precision("auto", cuda) == "fp32"
    assert [resolve_precision(p, d) for p in ("fp32", "bf16") for d in (cpu, cuda)] == ["fp32"] * 2 + ["bf16"] * 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_a_bf16_step_is_the_fp32_step_to_bf16_rounding(tmp_path, device):
    """bf16 autocast changes the step's gradient by rounding only: the same direction and size, not the
    same bits (which would mean autocast did nothing)."""
    from conftest import smoke_config
    from metarestore.engine import MetaTrainer

    grads = {}
    for precision in ("fp32", "bf16"):
        trainer = MetaTrainer(smoke_config(tmp_path, f"train.precision={precision}", "train.grad_clip=0"),
                              device=device)
        assert trainer.precision == precision
        trainer.run_step()
        grads[precision] = torch.cat([p.grad.reshape(-1) for p in trainer.params if p.grad is not None])
    fp32, bf16 = grads["fp32"], grads["bf16"]
    assert not torch.equal(fp32, bf16)
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=0) > 0.99
    assert (bf16.norm() / fp32.norm() - 1).abs() < 0.05


def test_capped_psnr_loss_bounds_the_weight_of_nearly_clean_images():
    """Per-image PSNR weighs an image by 1/MSE, so one nearly clean patch outweighs a damaged one a
    thousandfold; the capped loss keeps the same value on damaged images and bounds that ratio."""
    from metarestore.meta.losses import psnr_capped_loss, psnr_loss

    target = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    scale = torch.tensor([1e-4, 1e-1]).view(2, 1, 1, 1)  # ~80 dB and ~20 dB

    def per_image_grad_norms(loss_fn):
        pred = (target + scale * noise).requires_grad_()
        loss_fn(pred, target).backward()
        return pred.grad.flatten(1).norm(dim=1)

    plain, capped = per_image_grad_norms(psnr_loss), per_image_grad_norms(psnr_capped_loss)
    assert plain[0] / plain[1] > 50  # the clean image dominates the plain loss...
    assert capped[0] / capped[1] < 1  # ...and not the capped one
    damaged = target + 0.1 * noise
    assert float(psnr_capped_loss(damaged, target)) == pytest.approx(float(psnr_loss(damaged, target)), abs=0.05)


def per_parameter_metasgd(model, steps=2, first_order=True):
    """Meta-SGD learning one rate per adapted number and step, the network frozen (``configs/meta-sgd.yaml``)."""
    cfg = MetaConfig(algorithm="metasgd", inner_steps=steps, inner_lr={"default": 0.05}, loss="charbonnier",
                     zero_shot_weight=0.0, rates="parameter", first_order=first_order)
    lrn = make_learner(model, cfg).to(torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    return lrn


@pytest.mark.parametrize("first_order", [True, False])
def test_per_parameter_rates_get_the_exact_gradient_of_a_one_step_adaptation(first_order):
    """With one inner step, ``theta - rate * g(theta)``: g does not depend on the rates, so first and second
    order both give the exact derivative of the query loss, which finite differences check."""
    model, ep = tiny("film"), episode()
    lrn = per_parameter_metasgd(model, steps=1, first_order=first_order)
    assert lrn.log_rates.shape == (1, sum(p.numel() for p in adaptable_params(model).values()))
    lrn.task_gradient(ep, scale=1.0)
    analytic = lrn.log_rates.grad.clone()
    assert all(p.grad is None for p in model.parameters()), "the frozen network gets no gradient"
    direction = torch.randn(lrn.log_rates.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def objective(sign, eps=1e-6):
        with torch.no_grad():
            lrn.log_rates.add_(sign * eps * direction)
        fast = adapt(model, ep.support_x, ep.support_y, steps=1, lrs=lrn.rates(), loss_fn=charbonnier)
        value = float(charbonnier(forward_with(model, fast, ep.query_x), ep.query_y))
        with torch.no_grad():
            lrn.log_rates.sub_(sign * eps * direction)
        return value

    numeric = (objective(1) - objective(-1)) / 2e-6
    assert float((analytic * direction).sum()) == pytest.approx(numeric, rel=1e-5)


def test_per_parameter_rates_are_a_schedule_one_row_per_step():
    """Step k moves each adapted number by its own rate of row k; past the last row, the last applies."""
    model, ep = tiny("film"), episode()
    lrn = per_parameter_metasgd(model, steps=2)
    with torch.no_grad():
        lrn.log_rates[0].uniform_(-5, -2)
        lrn.log_rates[1].uniform_(-4, -1)
    rows = lrn.rates()
    params = adaptable_params(model, detach=True)
    for step in range(3):
        (g,) = [torch.autograd.grad(charbonnier(forward_with(model, params, ep.support_x), ep.support_y),
                                    list(params.values()))]
        params = {n: (p - rows[min(step, 1)][n] * gn).detach().requires_grad_(True)
                  for (n, p), gn in zip(params.items(), g, strict=True)}
    adapted = lrn.adapt(ep.support_x, ep.support_y, steps=3)
    for name, value in params.items():
        torch.testing.assert_close(adapted[name], value, rtol=1e-9, atol=1e-12)
    assert not torch.equal(rows[0][name], rows[1][name])


@pytest.mark.parametrize("first_order", [True, False])
def test_per_parameter_metasgd_batched_step_equals_per_task(first_order):
    model = tiny("film")
    lrn = per_parameter_metasgd(model, steps=2, first_order=first_order)
    episodes, scales = [episode(seed) for seed in range(3)], [0.5, 0.2, 0.3]
    expected = [lrn.task_gradient(ep, scale) for ep, scale in zip(episodes, scales, strict=True)]
    per_task = lrn.log_rates.grad.clone()
    lrn.zero_grad(set_to_none=True)
    losses = lrn.batch_gradient(EpisodeBatch.stack(episodes), torch.tensor(scales, dtype=torch.float64))
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0)
    assert per_task.abs().sum() > 0
    torch.testing.assert_close(lrn.log_rates.grad, per_task, rtol=1e-5, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_per_parameter_rates_adapt_on_cuda_as_on_cpu():
    model, ep = tiny("film", torch.float32), episode(dtype=torch.float32)
    lrn = per_parameter_metasgd(model, steps=2).float()
    with torch.no_grad():
        lrn.log_rates.uniform_(-5, -2)
    cpu = lrn.adapt(ep.support_x, ep.support_y, steps=3)
    gpu = lrn.to("cuda").adapt(ep.support_x, ep.support_y, steps=3)
    for name in cpu:
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=1e-4, atol=1e-5)


def test_adam_adaptation_is_torch_adam_on_the_support_loss():
    """``MetaLearner.adapt(optimizer="adam")`` takes the steps ``torch.optim.Adam`` takes on the same support
    loss from the same start (whole pairs: no windows), and leaves the model untouched."""
    from metarestore.meta.adapt import ADAM_LR

    model, ep = tiny("decoder"), episode(size=16)
    lrn = learner(model, "fomaml")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fast = lrn.adapt(ep.support_x, ep.support_y, steps=4, optimizer="adam")
    params = {n: p.detach().clone().requires_grad_(True) for n, p in adaptable_params(model, detach=True).items()}
    reference = torch.optim.Adam(list(params.values()), lr=ADAM_LR)
    for _ in range(4):
        reference.zero_grad()
        charbonnier(forward_with(model, params, ep.support_x), ep.support_y).backward()
        reference.step()
    for name, value in params.items():
        torch.testing.assert_close(fast[name], value.detach(), rtol=1e-9, atol=1e-12)
    assert any(not torch.equal(fast[n], adaptable_params(model, detach=True)[n]) for n in fast)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    with pytest.raises(ValueError, match="unknown inner optimizer"):
        lrn.adapt(ep.support_x, ep.support_y, steps=1, optimizer="lbfgs")
