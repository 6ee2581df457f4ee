"""Operator identification and operator + prior adaptation (metarestore.operators), on real images."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch

from metarestore.degradations.blur import motion_kernel
from metarestore.metrics import psnr
from metarestore.operators import (
    Adapter,
    AdapterError,
    fit_adapter,
    fit_haze,
    fit_kernel,
    fit_noise,
    fit_tone,
)
from metarestore.operators.fourier import convolve
from metarestore.operators.paths import Operators, Path

IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel")


def crops(size: int, n: int = 6, offset: int = 100) -> torch.Tensor:
    out = []
    for name in IMAGES[:n]:
        image = getattr(skimage.data, name)()[offset:offset + size, offset:offset + size, :3]
        out.append(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def disc_kernel(radius: float) -> torch.Tensor:
    """A defocus disc (no registered family uses one): anti-aliased by 4x supersampling."""
    r = int(np.ceil(radius))
    fine = (np.arange(-(r + 0.375), r + 0.5, 0.25))
    yy, xx = np.meshgrid(fine, fine, indexing="ij")
    inside = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    k = inside.reshape(2 * r + 1, 4, 2 * r + 1, 4).mean(axis=(1, 3))
    return torch.from_numpy(k / k.sum())


def blurred(x: torch.Tensor, kernel: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (convolve(x, kernel) + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("kernel", [motion_kernel(11, 30.0), disc_kernel(3.5)], ids=["motion", "disc"])
def test_kernel_fit_recovers_a_known_kernel_from_five_pairs(kernel):
    clean = crops(128, 5)
    fit = fit_kernel(clean, blurred(clean, kernel, 0.01), size=31)
    pad = (fit.size - kernel.shape[-1]) // 2
    truth = torch.nn.functional.pad(kernel, (pad, pad, pad, pad))
    assert float((fit.kernel - truth).norm() / truth.norm()) < 0.15
    assert abs(float(fit.kernel.sum()) - 1) < 1e-6
    assert fit.residual < 0.1  # the noise is all that is left


def test_tone_fit_undoes_a_curve_and_a_colour_matrix():
    clean = crops(64, 5).double()
    matrix = torch.tensor([[0.8, 0.15, 0.0], [0.05, 0.85, 0.1], [0.1, 0.0, 0.7]], dtype=torch.float64)
    degraded = torch.einsum("ij,bjhw->bihw", matrix, clean).clamp(0, 1) ** 0.6
    fit = fit_tone(clean, degraded)
    assert fit.residual < 0.05
    assert psnr(fit.restore(degraded), clean) > psnr(degraded, clean) + 15
    assert fit_tone(clean, degraded, curves=False).residual > 2 * fit.residual  # the curve matters


def test_noise_fit_finds_level_and_signal_dependence():
    clean = crops(96, 4).double()
    g = torch.Generator().manual_seed(1)
    flat = fit_noise(clean, clean + 0.04 * torch.randn(clean.shape, generator=g, dtype=torch.float64))
    assert abs(flat.sigma - 0.04) < 0.005 and not flat.signal_dependent
    shot = clean + torch.randn(clean.shape, generator=g, dtype=torch.float64) * (0.02 * clean + 1e-5).sqrt()
    fit = fit_noise(clean, shot)
    assert fit.signal_dependent and 0.01 < fit.gain < 0.03


def test_haze_fit_recovers_a_coloured_airlight():
    clean = crops(64, 4)
    airlight = torch.tensor([0.9, 0.8, 0.6])
    depth = torch.linspace(0.2, 1.0, 64)[None, None, :, None].expand(4, 1, 64, 64)
    t = torch.exp(-1.5 * depth)
    fit = fit_haze(clean, clean * t + (1 - t) * airlight[None, :, None, None])
    assert torch.allclose(fit.airlight, airlight, atol=0.02)


@pytest.fixture(scope="module")
def learner(smoke_model):
    from metarestore.hub import load_learner

    return load_learner(smoke_model["checkpoint"])[0]


def test_deconvolution_with_the_network_beats_zero_shot_on_an_unseen_blur(learner):
    """The smoke model never saw a disc (defocus) kernel; five pairs identify it."""
    clean = crops(64, 6)
    degraded = blurred(clean, disc_kernel(3.0), 0.005)
    adapter = fit_adapter(learner, degraded[:5], clean[:5], paths=["deconv@0.01"])
    test_x, test_y = degraded[5:], clean[5:]
    zero_shot = psnr(learner.restore(test_x), test_y)
    assert psnr(adapter.restore(test_x), test_y) > zero_shot + 1.0


def test_adapter_choice_never_scores_a_pair_it_fitted_on(learner, monkeypatch):
    """Every operator fit and every FiLM adaptation (its folds batched on the task dimension) is recorded
    with the fold it ran in: the fold's held-out pair (identified by its pixels) is never among the images
    they were given."""
    import metarestore.operators.adapter as adapter_module

    clean = crops(48, 4)
    degraded = blurred(clean, motion_kernel(7, 60.0), 0.005)
    folds: list[tuple[list[int], int]] = []
    seen: list[tuple[int, torch.Tensor]] = []  # (fold number, degraded images a fit was given)
    real_fit, real_adapt = adapter_module.Operators.fit, learner.adapt

    def record(batch):
        if batch.dim() == 5:  # the adapted round: fold t of the round's folds on the task dimension
            seen.extend((len(folds) - len(batch) + t, task) for t, task in enumerate(batch))
        elif batch.shape[0] < len(degraded):  # the final refit on all pairs is not a validation fold
            seen.append((len(folds) - 1, batch))

    monkeypatch.setattr(adapter_module.Operators, "fit",
                        classmethod(lambda cls, c, d, needed: (record(d), real_fit(c, d, needed))[1]))
    monkeypatch.setattr(learner, "adapt", lambda x, y, steps=None, **kw: (record(x), real_adapt(x, y, steps, **kw))[1])
    adapter = fit_adapter(learner, degraded, clean, paths=["zero_shot", "film", "deconv@0.01"], steps=1,
                          on_fold=lambda fit, held: folds.append((fit, held)))
    assert [h for _, h in folds] == [0, 1, 2, 3] * 2  # a round of plain paths, a round of adapted ones
    assert all(h not in f and sorted([*f, h]) == [0, 1, 2, 3] for f, h in folds)
    assert {fold for fold, _ in seen} == set(range(8))  # operators, then FiLM, were fitted in every fold
    for fold, batch in seen:
        held = degraded[folds[fold][1]]
        assert not any(torch.equal(row, held) for row in batch)
    info = adapter.info
    assert info["validation"] == "leave-one-out" and info["folds"] == 4
    assert info["path"] in info["scores"] and info["psnr_after"] == max(info["scores"].values())


def test_adapted_paths_build_only_on_a_pre_step_that_helps(learner):
    """On a blur, deconvolution helps by itself and a tone inversion cannot: FiLM is validated on top of
    the first and never fitted on top of the second (its score is null)."""
    from metarestore.operators.selection import HELPS_DB

    clean = crops(64, 5)
    degraded = blurred(clean, disc_kernel(3.0), 0.005)
    adapter = fit_adapter(learner, degraded, clean, steps=1,
                          paths=["zero_shot", "deconv@0.01", "deconv@0.01+film", "tone", "tone+film"])
    scores = adapter.info["scores"]
    assert scores["deconv@0.01"] > scores["zero_shot"] + HELPS_DB
    assert scores["tone"] <= scores["zero_shot"] + HELPS_DB
    assert scores["deconv@0.01+film"] is not None and scores["tone+film"] is None
    assert adapter.path.name in ("deconv@0.01", "deconv@0.01+film")


def test_hqs_is_scored_only_where_deconvolution_helps(learner):
    """hqs refines a deconvolution with the restorer (four more forward passes): on a blur it is scored,
    on a colour cast (where no deconvolution helps) it is not (null), and the scores of the paths that
    were scored are those each path gets alone (the batched pass changes nothing)."""
    clean = crops(64, 4)
    paths = ["zero_shot", "deconv@0.01", "hqs@0.01", "tone"]
    blur = fit_adapter(learner, blurred(clean, disc_kernel(3.0), 0.005), clean, paths=paths)
    assert blur.info["scores"]["hqs@0.01"] is not None
    cast = (clean * torch.tensor([1.0, 0.75, 0.55]).view(1, 3, 1, 1)).clamp(0, 1)
    tinted = fit_adapter(learner, cast, clean, paths=paths)
    assert tinted.info["scores"]["hqs@0.01"] is None and tinted.path.name != "hqs@0.01"
    for name in ("zero_shot", "tone"):  # each alone (its own forward passes) against the batched pass
        alone = fit_adapter(learner, cast, clean, paths=[name, "deconv@0.01"]).info["scores"][name]
        assert alone == pytest.approx(tinted.info["scores"][name], abs=1e-3)


def test_kernel_paths_are_ruled_out_where_the_fitted_kernel_is_the_identity(learner):
    """A colour cast fits the identity kernel in every fold: the kernel paths (deconv, hqs, wiener, rl and
    FiLM on a deconvolution) are ruled out before any is scored (null, listed, never chosen); on a blur
    they are scored, and Richardson-Lucy only because deconvolution helps there."""
    clean = crops(64, 4)
    paths = ["zero_shot", "deconv@0.01", "deconv@0.01+film", "hqs@0.01", "wiener@0.01", "rl", "tone"]
    cast = (clean * torch.tensor([1.25, 1.0, 0.8]).view(1, 3, 1, 1)).clamp(0, 1)  # bench_serving's cast
    tinted = fit_adapter(learner, cast, clean, paths=paths, steps=1)
    kernel_paths = {"deconv@0.01", "deconv@0.01+film", "hqs@0.01", "wiener@0.01", "rl"}
    assert set(tinted.info["ruled_out"]) == kernel_paths
    assert all(tinted.info["scores"][p] is None for p in kernel_paths)
    assert tinted.info["scores"]["tone"] is not None and tinted.path.name not in kernel_paths
    blur = fit_adapter(learner, blurred(clean, disc_kernel(3.0), 0.005), clean, paths=paths, steps=1)
    assert blur.info["ruled_out"] == []
    assert all(blur.info["scores"][p] is not None for p in ("deconv@0.01", "wiener@0.01", "rl"))
    assert fit_kernel(clean, cast).identity and not fit_kernel(clean, blurred(clean, disc_kernel(3.0), 0.0)).identity


def test_one_shot_validates_on_halves_or_falls_back_to_zero_shot(learner):
    clean = crops(64, 1)
    degraded = blurred(clean, motion_kernel(7, 60.0), 0.005)
    folds = []
    adapter = fit_adapter(learner, degraded, clean, paths=["zero_shot", "deconv@0.01"], on_fold=lambda f, h: folds.append((f, h)))
    assert adapter.info["validation"] == "split-halves" and folds == [([0], 1), ([1], 0)]
    small = fit_adapter(learner, degraded[..., :40, :40], clean[..., :40, :40], paths=["zero_shot", "deconv@0.01"])
    assert small.path.name == "zero_shot" and small.info["folds"] == 0


def test_an_adapter_never_chooses_a_path_that_scores_below_the_input(learner, tmp_path):
    """``identity`` (leave the image as it is) is a candidate of every automatic fit and scores exactly the
    input's PSNR: on pairs that nothing can improve (a degradation that only posterises) the adapter keeps
    the image, its report's gain over the input is zero, and it restores to the very input, also after a
    round trip through storage."""
    from metarestore.operators.paths import IDENTITY, default_paths

    assert default_paths(learner)[0] == IDENTITY and Path.parse("identity") == IDENTITY
    assert IDENTITY.name == "identity" and Path.parse("zero_shot").name == "zero_shot"
    clean = crops(64, 4)
    degraded = (clean * 7).round() / 7  # posterised: 8 levels a channel, nothing a path here can undo
    adapter = fit_adapter(learner, degraded, clean, steps=1)
    info = adapter.info
    assert info["scores"]["identity"] == pytest.approx(info["psnr_before"], abs=1e-3)
    assert info["psnr_after"] >= info["psnr_before"] - 1e-3, info["scores"]  # never below the input
    if adapter.path == IDENTITY:
        assert torch.equal(adapter.restore(degraded), degraded.clamp(0, 1))
    forced = fit_adapter(learner, degraded, clean, paths=["identity"])
    forced.save(tmp_path / "keep")
    assert torch.equal(Adapter.load(tmp_path / "keep", learner).restore(degraded), degraded)


def test_adapter_round_trips_through_safetensors_and_rejects_garbage(learner, tmp_path):
    clean = crops(48, 3)
    degraded = blurred(clean, motion_kernel(7, 60.0), 0.005)
    adapter = fit_adapter(learner, degraded, clean, paths=["deconv@0.01+film"], steps=1)
    adapter.save(tmp_path / "a")
    loaded = Adapter.load(tmp_path / "a", learner)
    assert loaded.path == adapter.path and loaded.info == adapter.info
    assert torch.allclose(loaded.restore(degraded), adapter.restore(degraded), atol=1e-5)
    data = adapter.to_bytes()
    with pytest.raises(AdapterError):
        Adapter.from_bytes(data[:100], learner)
    with pytest.raises(AdapterError):
        Adapter.from_bytes(b"\x00" * 64, learner)


def test_a_lora_adapter_round_trips_with_identical_restoration(learner):
    import json

    from safetensors.torch import load, save

    from metarestore.operators.storage import metadata as _metadata

    clean = crops(48, 3)
    degraded = (clean * torch.tensor([1.0, 0.85, 0.7]).view(1, 3, 1, 1) + 0.04).clamp(0, 1)  # a colour cast
    adapter = fit_adapter(learner, degraded, clean, paths=["lora"], steps=2)
    assert adapter.path.name == "lora" and adapter.info["steps"] == 2
    assert adapter.params and all(n.endswith((".lora_a", ".lora_b")) for n in adapter.params)
    assert any(float(v.abs().max()) > 0 for n, v in adapter.params.items() if n.endswith(".lora_b"))
    data = adapter.to_bytes()
    loaded = Adapter.from_bytes(data, learner)
    assert loaded.path.name == "lora" and set(loaded.params) == set(adapter.params)
    assert torch.equal(loaded.restore(degraded), adapter.restore(degraded))
    assert not torch.equal(adapter.restore(degraded), learner.restore(degraded))  # it does adapt
    forced = fit_adapter(learner, degraded, clean, paths=["deconv@0.01+lora"], steps=1)
    assert forced.path.restorer == "lora" and forced.info["steps"] == 1
    film = Adapter.from_bytes(fit_adapter(learner, degraded, clean, paths=["film"], steps=1).to_bytes(), learner)
    header = json.loads(_metadata(film.to_bytes())["adapter"])
    mismatched = save({k: v.contiguous() for k, v in load(film.to_bytes()).items()},
                      metadata={"adapter": json.dumps({**header, "path": "lora"})})
    with pytest.raises(AdapterError, match="lora"):  # FiLM tensors under a LoRA path: refused, not guessed
        Adapter.from_bytes(mismatched, learner)


def test_paths_name_every_registered_adapter_kind():
    from metarestore.model.kinds import KINDS
    from metarestore.operators import Path

    for kind in KINDS:
        assert Path.parse(kind) == Path(restorer=kind) and Path.parse(kind).name == kind
        assert Path.parse(f"deconv@0.01+{kind}") == Path("deconv", 0.01, kind)
    with pytest.raises(ValueError, match="unknown adapter kind 'prompt'"):
        Path.parse("deconv@0.01+prompt")
    # a told chain (a model's row for noise then JPEG) parses as one family, with or without a kind after it
    for name, told, restorer, passes in (("told:gaussian_noise+jpeg", "gaussian_noise+jpeg", "net", 1),
                                         ("told:gaussian_noise+jpeg+film", "gaussian_noise+jpeg", "film", 1),
                                         ("told:gaussian_noise+jpeg*2", "gaussian_noise+jpeg", "net", 2)):
        path = Path.parse(name)
        assert (path.told, path.restorer, path.passes) == (told, restorer, passes) and path.name == name
    with pytest.raises(ValueError, match="unknown adapter kind 'prompt'"):
        Path.parse("told:jpeg+prompt")


def test_batched_folds_equal_adapting_each_fold_alone(learner):
    """``MetaLearner.adapt`` with a task dimension (the folds of one candidate at once) gives each task the
    state that adapting it alone, with its own windows (seed + t), gives; and the batched validation
    scores equal restoring each held-out pair with its fold's own state."""
    from metarestore.operators.folds import make_folds
    from metarestore.operators.scoring import score_adapted

    clean = crops(48, 4)
    degraded = (clean * torch.tensor([1.0, 0.85, 0.7]).view(1, 3, 1, 1) + 0.04).clamp(0, 1)
    folds, _ = make_folds(degraded, clean, 3)
    fit_x, fit_y = torch.stack([f[0] for f in folds]), torch.stack([f[1] for f in folds])
    for kind in ("film", "lora"):
        for optimizer in ("sgd", "adam"):
            together = learner.adapt(fit_x, fit_y, steps=3, kind=kind, patch=32, seed=5, optimizer=optimizer)
            for t in range(len(folds)):
                alone = learner.adapt(fit_x[t], fit_y[t], steps=3, kind=kind, patch=32, seed=5 + t, optimizer=optimizer)
                # Adam's step is gradient / its root mean square: where a gradient is ~0, float noise moves the
                # number by up to ~1e-4 of the rate (0.01), which no SGD step would show
                atol = 1e-6 if optimizer == "sgd" else 1e-5
                for name, value in alone.items():
                    torch.testing.assert_close(together[name][t], value, rtol=1e-4, atol=atol)
    none = [Operators() for _ in folds]
    scores, states = score_adapted(learner, Path(restorer="film"), folds, none, steps=3, patch=32)  # Adam
    for t, (fx, fy, hx, hy, _, _) in enumerate(folds):
        alone = learner.adapt(fx, fy, steps=3, kind="film", patch=32, seed=t, optimizer="adam")
        for name, value in alone.items():
            torch.testing.assert_close(states[name][t], value, rtol=1e-4, atol=1e-5)
        assert scores[t] == pytest.approx(psnr(learner.restore(hx, alone, kind="film"), hy), abs=1e-3)
    assert len(set(scores)) == len(scores)  # three folds, three different held-out pairs


def test_validated_with_the_final_steps_the_adapter_is_its_fold_states_average(learner):
    """An adapted path validated with as many steps as the final fit keeps the mean of its fold states (each
    fitted without its held-out pair) instead of fitting again; with fewer validation steps it is fitted
    on all pairs. Either way the adapter restores with the state it reports."""
    from metarestore.operators.folds import make_folds
    from metarestore.operators.scoring import score_adapted

    clean = crops(48, 4)
    degraded = (clean * torch.tensor([1.0, 0.85, 0.7]).view(1, 3, 1, 1) + 0.04).clamp(0, 1)
    kept = fit_adapter(learner, degraded, clean, force="film", steps=2, max_folds=2, patch=32)
    assert kept.info["final_fit"] == "fold average" and kept.info["validation_steps"] == 2
    folds, _ = make_folds(degraded, clean, 2)
    _, states = score_adapted(learner, Path(restorer="film"), folds, [Operators() for _ in folds], 2, 32)
    for name, value in kept.params.items():
        torch.testing.assert_close(value, states[name].mean(0))
    refit = fit_adapter(learner, degraded, clean, force="film", steps=2, validation_steps=1, max_folds=2, patch=32)
    assert refit.info["final_fit"] == "all pairs"
    alone = learner.adapt(degraded, clean, steps=2, kind="film", patch=32, optimizer="adam")
    for name, value in refit.params.items():
        torch.testing.assert_close(value, alone[name].detach())
    torch.testing.assert_close(kept.restore(degraded), learner.restore(degraded, kept.params, kind="film"))


def test_a_budget_never_yields_a_path_scored_on_fitted_pairs(learner):
    """A spent budget skips the adapted candidates (null scores, listed as skipped): the choice stays among
    the paths scored on held-out pairs; a budget never reached changes nothing."""
    clean = crops(48, 4)
    degraded = (clean * torch.tensor([1.0, 0.85, 0.7]).view(1, 3, 1, 1) + 0.04).clamp(0, 1)
    paths = ["zero_shot", "tone", "film", "tone+film", "lora"]
    folds = []
    spent = fit_adapter(learner, degraded, clean, paths=paths, steps=2, budget_s=0.0,
                        on_fold=lambda f, h: folds.append((f, h)))
    info = spent.info
    assert {"film", "lora"} <= set(info["skipped"]) <= {"film", "lora", "tone+film"}
    assert all(info["scores"][p] is None for p in info["skipped"])
    assert spent.path.name in ("zero_shot", "tone") and info["psnr_after"] == info["scores"][spent.path.name]
    assert info["steps"] == 0 and spent.params is None
    assert all(h not in f for f, h in folds)
    free = fit_adapter(learner, degraded, clean, paths=paths, steps=2, validation_steps=1)
    ample = fit_adapter(learner, degraded, clean, paths=paths, steps=2, validation_steps=1, budget_s=1e9)
    assert free.info["skipped"] == ample.info["skipped"] == []
    assert free.path == ample.path and free.info["scores"] == ample.info["scores"]
    assert all(free.info["scores"][p] is not None for p in ("film", "lora"))
    if free.path.adapted:
        assert free.info["steps"] == 2 and free.info["validation_steps"] == 1


def gradient_clock(monkeypatch, learner, per_window: float = 0.01) -> list[float]:
    """The selection's clock replaced by one that only ``learner``'s gradient steps advance (``per_window``
    seconds per step and window): budget tests are deterministic, no timing. Returns the clock (a list of one)."""
    import types

    import metarestore.operators.selection as selection_module

    clock = [0.0]
    real_adapt = learner.adapt

    def adapt(x, y, steps=None, on_step=None, **kw):
        windows = x.shape[0] * x.shape[1] if x.dim() == 5 else x.shape[0]

        def step_done(done):
            clock[0] += per_window * windows
            if on_step is not None:
                on_step(done)

        return real_adapt(x, y, steps, on_step=step_done, **kw)

    monkeypatch.setattr(learner, "adapt", adapt)
    monkeypatch.setattr(selection_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    return clock


def test_the_budget_counts_the_final_fit_a_candidate_would_need(learner, monkeypatch):
    """With a clock that only the gradient steps advance (0.01 s per step and window), an adapted candidate
    is validated only if the time spent, its validation and the final fit it would need (predicted from its
    own steps as they go) fit in the budget; one stopped is skipped: deterministic, no timing."""
    gradient_clock(monkeypatch, learner)
    clean = crops(48, 4)
    degraded = (clean * torch.tensor([1.25, 1.0, 0.8]).view(1, 3, 1, 1)).clamp(0, 1)
    paths = ["zero_shot", "film", "lora"]
    # a validation step over 2 folds x 3 pairs: 0.06 s; with 1 validation step of 2 the final fit is a fit of
    # its own, 2 steps x 4 pairs: 0.08 s. film: 0.06 + 0.08 = 0.14; lora: 0.06 (film's) + 0.06 + 0.08 = 0.20
    kw = {"paths": paths, "steps": 2, "validation_steps": 1, "max_folds": 2}
    tight = fit_adapter(learner, degraded, clean, budget_s=0.13, **kw)  # 0.14 > 0.13: neither validated
    assert tight.info["skipped"] == ["film", "lora"] and tight.info["path"] == "zero_shot"
    middle = fit_adapter(learner, degraded, clean, budget_s=0.17, **kw)  # film 0.14 <= 0.17, lora 0.20 > 0.17
    assert middle.info["skipped"] == ["lora"] and middle.info["scores"]["film"] is not None
    roomy = fit_adapter(learner, degraded, clean, budget_s=0.20, **kw)  # 0.20 <= 0.20: both validated
    assert roomy.info["skipped"] == [] and roomy.info["scores"]["lora"] is not None
    # a candidate stopped after its first step tells what the next one of its kind costs: that one never starts.
    # 2 validation steps of 4: film after one, 0.06 + 0.06 x (1 + 16/6 final) = 0.28 > 0.25, stopped; tone+film
    # would need 0.06 + 0.06 x (2 + 16/6) = 0.34 (a cost per step taken over all validation steps said 0.20)
    clock = gradient_clock(monkeypatch, learner)
    stopped = fit_adapter(learner, degraded, clean, budget_s=0.25, **{**kw, "steps": 4, "validation_steps": 2,
                                                                     "paths": ["zero_shot", "film", "tone", "tone+film"]})
    assert set(stopped.info["skipped"]) == {"film", "tone+film"} and clock[0] == pytest.approx(0.06)
    # validated with the final fit's steps, a candidate needs no final fit: 2 steps of 0.06 s each
    kept = fit_adapter(learner, degraded, clean, budget_s=0.13, **{**kw, "validation_steps": 2})
    assert kept.info["skipped"] == ["lora"] and kept.info["scores"]["film"] is not None


def test_candidates_are_scored_on_one_window_of_each_held_out_pair_corners_first(learner):
    """With ``score_side`` every candidate is scored on the same window of each held-out pair (and only there),
    fold 0's in the top-left corner, fold 1's in the bottom-right (``folds.WINDOW_PLACES``: what varies over
    the frame, such as vignetting, shows in the scores): zero-shot's score is those windows' PSNR, whatever
    lies outside them."""
    clean = crops(48, 3)
    degraded = (clean * torch.tensor([1.0, 0.85, 0.7]).view(1, 3, 1, 1) + 0.04).clamp(0, 1)
    adapter = fit_adapter(learner, degraded, clean, paths=["zero_shot", "tone"], max_folds=2, score_side=24)
    corners = [(slice(0, 24), slice(0, 24)), (slice(24, 48), slice(24, 48))]
    windows = [psnr(learner.restore(degraded[i:i + 1, :, r, c]), clean[i:i + 1, :, r, c])
               for i, (r, c) in enumerate(corners)]
    assert adapter.info["folds"] == 2
    assert adapter.info["scores"]["zero_shot"] == pytest.approx(sum(windows) / 2, abs=1e-3)
    outside = degraded.clone()
    outside[..., :24, 24:] = 0  # the top-right quarter: outside both folds' windows
    moved = fit_adapter(learner, outside, clean, paths=["zero_shot", "tone"], max_folds=2, score_side=24)
    assert moved.info["scores"]["zero_shot"] == adapter.info["scores"]["zero_shot"]


def test_when_the_budget_admits_one_adapted_candidate_it_is_the_one_on_the_best_plain_path(told_checkpoint,
                                                                                         monkeypatch):
    """Adapted candidates are validated in the order of the plain path each starts from: FiLM polishing
    ``told:jpeg`` (what the pairs are) before FiLM on the blind model, so a budget with room for one spends
    it there (``gradient_clock``: only gradient steps advance time)."""
    from metarestore.hub import load_learner

    told, _ = load_learner(told_checkpoint)
    gradient_clock(monkeypatch, told)
    degraded = crops(48, 4)
    clean = told.restore(degraded, family="jpeg")
    # per candidate a validation step 0.06 and the final fit 0.08: 0.14, then 0.20 > 0.17
    adapter = fit_adapter(told, degraded, clean, steps=2, validation_steps=1, max_folds=2, budget_s=0.17,
                          paths=["zero_shot", "film", "told:gaussian_noise", "told:jpeg"])
    assert adapter.info["skipped"] == ["film"]
    assert adapter.info["scores"]["told:jpeg+film"] is not None


def jpeg(x: torch.Tensor, quality: int, subsampling: int) -> torch.Tensor:
    """Pillow's JPEG round trip, written here independently of ``operators.codec``."""
    import io

    from PIL import Image

    out = []
    for image in x:
        buf = io.BytesIO()
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            buf, format="JPEG", quality=quality, subsampling=subsampling)
        out.append(torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


@pytest.mark.parametrize(("quality", "subsampling"), [(8, 2), (37, 0)])
def test_jpeg_fit_recovers_the_codec_setting_from_five_pairs(quality, subsampling):
    from metarestore.operators.codec import fit_jpeg

    clean = crops(64, 5)
    fit = fit_jpeg(clean, jpeg(clean, quality, subsampling))
    assert (fit.quality, fit.subsampling) == (quality, subsampling) and fit.residual < 1e-6 and fit.good
    assert not fit_jpeg(clean, blurred(clean, disc_kernel(2.0), 0.01)).good  # a blur is no JPEG


def test_pair_noise_fit_recovers_signal_dependent_noise_and_rejects_a_blur():
    from metarestore.operators.noise import fit_pair_noise

    clean = crops(96, 5)
    g = torch.Generator().manual_seed(0)
    noisy = (clean + (0.01 * clean + 0.02**2).sqrt() * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    fit = fit_pair_noise(clean, noisy)
    assert fit.good and abs(fit.gain - 0.01) < 0.002 and abs(fit.floor - 0.0004) < 0.0003
    assert not fit_pair_noise(clean, blurred(clean, disc_kernel(2.0), 0.005)).good


def test_jpeg_path_retrains_on_codec_pairs_and_round_trips(learner):
    """The codec fitted on five pairs re-encodes shifted, turned windows of their clean images, and the
    network is retrained on those; the adapter stores that network."""
    clean = crops(64, 7)
    degraded = jpeg(clean, 8, 2)
    support, test = [1, 3, 4, 5, 6], [0, 2]  # photographs to test on (not the star field, the colour wheel)
    adapter = fit_adapter(learner, degraded[support], clean[support], paths=["jpeg"])
    assert adapter.path.name == "jpeg" and adapter.operators.jpeg.quality == 8
    test_x = degraded[test]
    restored = adapter.restore(test_x)
    # the smoke model (width 8) is too small to gain from it (-0.03 dB measured); the base model's gain is
    # in the adaptation benchmark (docs/benchmarks.md); here: it is retrained, and stored exactly
    assert not torch.allclose(restored, learner.restore(test_x), atol=1e-3)
    loaded = Adapter.from_bytes(adapter.to_bytes(), learner)
    assert loaded.path.name == "jpeg" and torch.allclose(loaded.restore(test_x), restored, atol=1e-5)
    with pytest.raises(AdapterError):  # on a blur, the JPEG path cannot be fitted
        fit_adapter(learner, blurred(clean[:3], disc_kernel(2.0), 0.005), clean[:3], paths=["jpeg"])


def test_a_model_that_can_be_told_the_degradation_offers_told_paths(told_checkpoint, learner, tmp_path):
    """told:F (the model told family F) is a candidate for a model that can be told; auto picks it where it
    is what the pairs show, it round-trips, and neither a blind model, an unknown family nor one no image can
    show (awgn, which the model knows) can use one."""
    from metarestore.hub import load_learner
    from metarestore.operators.paths import default_paths

    told, _ = load_learner(told_checkpoint)
    names = [p.name for p in default_paths(told)]
    assert "awgn" in told.model.hint_families
    assert [n for n in names if n.startswith("told:")] == [f"told:{f}" for f in told.model.hint_families
                                                           if f != "awgn"]
    assert not any(n.startswith("told:") for n in (p.name for p in default_paths(learner)))
    assert Path.parse("told:jpeg") == Path(told="jpeg") and Path(told="jpeg").name == "told:jpeg"
    # pairs whose clean side is exactly what the model told "jpeg" makes of the degraded side
    degraded = crops(48, 4)
    clean = told.restore(degraded, family="jpeg")
    adapter = fit_adapter(told, degraded, clean, steps=1, max_folds=2,
                          paths=["zero_shot", "film", "told:gaussian_noise", "told:jpeg"])
    assert adapter.path.name == "told:jpeg", adapter.info["scores"]
    assert adapter.info["scores"]["told:jpeg"] > adapter.info["scores"]["told:gaussian_noise"] + 10
    # FiLM polishes the best told path only (one adapted candidate more, not one per family)
    assert "told:jpeg+film" in adapter.info["scores"] and "told:gaussian_noise+film" not in adapter.info["scores"]
    assert Path.parse("told:jpeg+film") == Path(restorer="film", told="jpeg")
    polished = fit_adapter(told, degraded, clean, steps=2, paths=["told:jpeg+film"])
    assert polished.path.name == "told:jpeg+film" and polished.params is not None
    again = Adapter.from_bytes(polished.to_bytes(), told)
    torch.testing.assert_close(again.restore(degraded), polished.restore(degraded))
    loaded = Adapter.from_bytes(adapter.to_bytes(), told)
    assert loaded.path == adapter.path
    torch.testing.assert_close(loaded.restore(degraded), clean)
    with pytest.raises(AdapterError, match="blind"):
        Adapter.from_bytes(adapter.to_bytes(), learner)
    with pytest.raises(AdapterError, match="haze"):
        fit_adapter(told, degraded, clean, paths=["told:haze"])
    with pytest.raises(ValueError, match="outside"):
        Path.parse("told:awgn")


def test_pairs_more_degraded_than_the_training_get_more_passes_of_the_told_restorer(told_checkpoint):
    """told:F*N (the model told F, N times) is scored for the best told path when it helps; auto picks it for
    pairs that two passes restore, it round-trips, and N is bounded."""
    from metarestore.hub import load_learner
    from metarestore.operators.paths import MAX_PASSES

    told, _ = load_learner(told_checkpoint)
    degraded = crops(48, 4)
    clean = told.restore(told.restore(degraded, family="jpeg"), family="jpeg")  # what two passes make of them
    adapter = fit_adapter(told, degraded, clean, steps=1, max_folds=2,
                          paths=["zero_shot", "told:gaussian_noise", "told:jpeg"])
    scores = adapter.info["scores"]
    assert adapter.path == Path(told="jpeg", passes=2) and adapter.path.name == "told:jpeg*2", scores
    assert {f"told:jpeg*{n}" for n in range(2, MAX_PASSES + 1)} <= set(scores)
    assert not any(n.startswith("told:gaussian_noise*") for n in scores)  # the best told path only
    assert scores["told:jpeg*2"] > scores["told:jpeg"] + 1
    torch.testing.assert_close(adapter.restore(degraded), clean)
    loaded = Adapter.from_bytes(adapter.to_bytes(), told)
    assert loaded.path == adapter.path
    torch.testing.assert_close(loaded.restore(degraded), clean)
    for bad in (f"told:jpeg*{MAX_PASSES + 1}", "told:jpeg*1", "told:jpeg*2+film", "told:jpeg*x"):
        with pytest.raises(ValueError, match="told:jpeg"):
            Path.parse(bad)


# one interface: every registered operator ---------------------------------------------------------------
def _haze(clean: torch.Tensor) -> torch.Tensor:
    depth = torch.linspace(0.2, 1.0, clean.shape[-1])[None, None, None, :]
    t = torch.exp(-1.2 * depth)
    return clean * t + (1 - t) * torch.tensor([0.9, 0.8, 0.6])[None, :, None, None]


def _shot_noise(clean: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return (clean + (0.01 * clean + 0.02**2).sqrt() * torch.randn(clean.shape, generator=g)).clamp(0, 1)


# operator name -> a degradation of that kind: a new operator needs a case here
OPERATOR_CASES = {
    "kernel": lambda c: blurred(c, disc_kernel(2.5), 0.002),
    "tone": lambda c: torch.einsum("ij,bjhw->bihw", torch.tensor([[0.8, 0.1, 0.0], [0.05, 0.9, 0.05], [0.1, 0.0, 0.75]]),
                                   c).clamp(0, 1) ** 0.7,
    "haze": _haze,
    "jpeg": lambda c: jpeg(c, 20, 2),
    "noise": _shot_noise,
}


@pytest.fixture(scope="module")
def operator_pairs():
    clean = crops(64, 5)
    return clean, {name: degrade(clean) for name, degrade in OPERATOR_CASES.items()}


def test_every_registered_operator_has_a_case_and_its_pre_steps_parse():
    from metarestore.operators import OPERATORS
    from metarestore.operators.catalog import PRE_STEPS, operator_of

    assert set(OPERATORS) == set(OPERATOR_CASES)
    for name, op in OPERATORS.items():
        assert op.name == name and op.pre_steps and set(op.classical) <= set(op.pre_steps)
        for pre in op.pre_steps:
            assert pre in PRE_STEPS and operator_of(pre) is op and Path.parse(pre).operator is op
            assert (Path.parse(pre).restorer == "none") == (pre in op.classical)


@pytest.mark.parametrize("name", sorted(OPERATOR_CASES))
def test_every_operator_round_trips_its_own_tensors_and_undoes_its_degradation(name, operator_pairs):
    """Fitted on pairs of its kind, an operator's forward model (where it has one) reproduces the degraded
    images, its restoring pre-step (where it needs no network) brings them closer to the clean ones, and
    what it stores reads back as the same operator."""
    from metarestore.operators import OPERATORS

    clean, degraded = operator_pairs[0], operator_pairs[1][name]
    op = OPERATORS[name]
    fit = op.fit(clean, degraded)
    assert isinstance(fit, op) and fit.good and fit.residual < 0.5
    back = op.read(fit.tensors(), fit.header(), fit.residual, None)
    assert type(back) is op and back.header() == fit.header() and back.residual == fit.residual
    assert set(back.tensors()) == set(fit.tensors())
    assert all(torch.equal(back.tensors()[n], v) for n, v in fit.tensors().items())
    assert op.read({}, {}, 0.0, None) is None  # an adapter without this operator
    try:
        forward = fit.apply(clean, torch.Generator().manual_seed(2))
    except NotImplementedError:
        forward = None  # fitted in the restoring direction only (tone, haze)
    if forward is not None and name != "noise":
        assert psnr(forward, degraded) > 35, "its forward model reproduces the degradation"
    if name == "noise":  # a random forward model: what it synthesises fits the same noise
        again = op.fit(clean, forward)
        assert abs(again.gain - fit.gain) < 0.2 * fit.gain and abs(again.floor - fit.floor) < 0.5 * fit.floor + 1e-5
    if not op.classical or name == "kernel":  # synthetic operators restore with a retrained network
        pre = op.pre_steps[0]
        restored = fit.restore(degraded, Path.parse(f"{pre}@0.01" if name == "kernel" else pre))
        assert psnr(restored, clean) > psnr(degraded, clean) + 2, name


def test_adapters_written_before_operators_had_one_interface_still_load(learner):
    """Format version 1 (``haze_omega`` and ``synthetic`` in the header): bytes the previous code wrote
    (tests/fixtures/adapter-v1-*.safetensors, tone, haze and Wiener paths) load with their operators, and
    write back as version 2 with the same tensors."""
    import json
    from pathlib import Path as FsPath

    from safetensors.torch import load

    from metarestore.operators.adapter import read_adapter
    from metarestore.operators.storage import VERSION, metadata

    fixtures = FsPath(__file__).parent / "fixtures"
    for name, path, operator in (("tone", "tone", "tone"), ("haze", "haze", "haze"), ("wiener", "wiener@0.01", "kernel")):
        data = (fixtures / f"adapter-v1-{name}.safetensors").read_bytes()
        header = json.loads(metadata(data)["adapter"])
        assert header["version"] == 1
        adapter = read_adapter(data, learner)
        assert adapter.path.name == path and list(adapter.operators.fits) == [operator]
        assert adapter.operators.residuals == header["residuals"] and adapter.info == header["info"]
        if name == "haze":
            assert adapter.operators.haze.omega == header["haze_omega"] != 0.95
        again = adapter.to_bytes()
        assert json.loads(metadata(again)["adapter"])["version"] == VERSION
        old, new = load(data), load(again)
        assert set(old) == set(new) and all(torch.equal(old[n], new[n]) for n in old)
        x = crops(32, 2)
        assert torch.equal(read_adapter(again, learner).restore(x), adapter.restore(x))


def test_forcing_a_path_is_one_fit_that_reports_its_held_out_score(learner):
    """``force``: the path is used whatever its score, validated beside the others in the same fit, so its
    info is that fit's (``fit_bounded``'s asked kind); a forced path that does not apply is refused."""
    from metarestore.inference import fit_bounded

    clean = crops(48, 4)
    cast = (clean * torch.tensor([1.25, 1.0, 0.8]).view(1, 3, 1, 1)).clamp(0, 1)
    free = fit_adapter(learner, cast, clean, paths=["deconv@0.01", "zero_shot", "tone"])
    forced = fit_adapter(learner, cast, clean, paths=["zero_shot", "tone"], force="deconv@0.01")
    assert free.path.name != "deconv@0.01" and forced.path.name == "deconv@0.01"
    assert forced.info["validation"] == "leave-one-out" and forced.info["ruled_out"] == ["deconv@0.01"]
    assert forced.info["psnr_after"] is None and forced.info["scores"]["tone"] == free.info["scores"]["tone"]
    bounded = fit_bounded(learner, cast, clean, kind="tone", steps=1)
    assert bounded.path.name == "tone" and bounded.info["psnr_after"] == bounded.info["scores"]["tone"] is not None
    assert set(bounded.info["scores"]) == {"tone", "zero_shot"} and bounded.info["kind"] == "tone"
    with pytest.raises(AdapterError, match="haze"):
        fit_adapter(learner, cast[:, :1], clean[:, :1], paths=["zero_shot"], force="haze")


def test_adapter_scores_are_the_evaluation_psnr():
    """One PSNR: the mean over images of each image's PSNR (torchmetrics' definition), which the loss, the
    adapter's held-out scores and evaluation share."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    from metarestore.meta.losses import psnr as evaluation_psnr
    from metarestore.meta.losses import psnr_loss
    from metarestore.operators.scoring import psnr as adapter_psnr

    clean = crops(32, 3)
    degraded = (clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    degraded[0] = clean[0] * 0.98  # images of very different quality: pooling the MSE would differ
    reference = float(peak_signal_noise_ratio(degraded, clean, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean())
    assert adapter_psnr is evaluation_psnr
    assert evaluation_psnr(degraded, clean) == pytest.approx(reference, abs=1e-4)
    assert float(-psnr_loss(degraded, clean, eps=0.0)) == pytest.approx(reference, abs=1e-3)
    assert evaluation_psnr(clean, clean) == pytest.approx(120.0)  # identical images: bounded, not infinite


def test_told_candidates_share_one_forward_pass_and_repeats_build_on_the_shorter(told_checkpoint, monkeypatch):
    """A fold's plain candidates run in one batched pass, each image told its own family (the same outputs as
    a pass each), and told:F*N reuses told:F*(N-1)'s output kept for the fold: N passes in all, not 1+2+..+N."""
    from metarestore.hub import load_learner
    from metarestore.operators.scoring import score_plain

    told, _ = load_learner(told_checkpoint)
    x = crops(32, 3)
    families = ["jpeg", None, "gaussian_noise"]
    together = told.restore(x, family=families)  # each image told its own family, one pass
    for i, family in enumerate(families):
        torch.testing.assert_close(together[i:i + 1], told.restore(x[i:i + 1], family=family), atol=1e-5, rtol=0)
    held_x, held_y, cache = x[:1], told.restore(told.restore(x[:1], family="jpeg"), family="jpeg"), {}
    passes, forward = [], told.model.forward  # the real forward pass, counted
    monkeypatch.setattr(told.model, "forward", lambda inp, hint=None: passes.append(len(inp)) or forward(inp, hint))
    no_operator = Operators.fit(held_y, held_x, set())
    first = score_plain(told, [Path(), Path(told="jpeg"), Path(told="gaussian_noise")], no_operator, held_x,
                        held_y, cache)
    assert passes == [3]  # zero-shot and both told paths: one pass of three images
    repeats = score_plain(told, [Path(told="jpeg", passes=2), Path(told="jpeg", passes=3)], no_operator, held_x,
                          held_y, cache)
    assert passes == [3, 1, 1]  # told:jpeg*2 from told:jpeg's output, *3 from *2's
    assert repeats["told:jpeg*2"] > first["told:jpeg"] + 1 and repeats["told:jpeg*2"] > repeats["told:jpeg*3"]
