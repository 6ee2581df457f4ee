"""Evaluation: seeded conditions, classical baselines, protocols, and real Ray + MLflow runs of the smoke model.

The identity rows are checked against PSNRs computed here, independently of the code under test:
the images come straight from scikit-image, are degraded through the registry with the parameters the
CSV records, and scored with ``skimage.metrics.peak_signal_noise_ratio``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from conftest import REPO, cli_in_process
from evaluation import baselines, protocols
from evaluation.conditions import Condition, degrade, load_dataset, support_set, task_params
from evaluation.metrics import quantize, to_y
from metarestore import degradations

COLUMNS = ["dataset", "image", "family", "family_role", "severity", "params", "method", "model", "shots", "steps",
           "psnr", "ssim", "lpips", "crop", "height", "width", "protocol", "seconds"]
CROP = 64


def embedded_clean(name: str, crop: int = CROP) -> np.ndarray:
    """An embedded validation image, straight from scikit-image, RGB float64 in [0, 1], centre-cropped."""
    array = getattr(skimage.data, name)()
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    h, w = array.shape[:2]
    top, left = (h - crop) // 2, (w - crop) // 2
    return array[top:top + crop, left:left + crop, :3].astype(np.float64) / 255.0


def registry_degrade(clean: np.ndarray, family: str, params: dict) -> np.ndarray:
    x = torch.from_numpy(clean).float().permute(2, 0, 1)[None]
    return degradations.get(family)(x, params)[0].permute(1, 2, 0).double().numpy()


# seeded conditions ---------------------------------------------------------------------------------
def test_degraded_inputs_are_seeded_per_image_and_identical_in_another_process():
    dataset = load_dataset("embedded", crop=CROP)
    cond = Condition("gaussian_noise", "0.5", severity=0.5)
    first = task_params(cond, dataset.name, dataset.names[0], seed=0)
    assert first == task_params(cond, dataset.name, dataset.names[0], seed=0)
    assert first["seed"] != task_params(cond, dataset.name, dataset.names[1], seed=0)["seed"]
    assert first != task_params(cond, dataset.name, dataset.names[0], seed=1)
    code = ("from evaluation.conditions import Condition, task_params; import json; "
            "print(json.dumps(task_params(Condition('gaussian_noise', '0.5', severity=0.5), 'embedded', "
            f"{dataset.names[0]!r}, 0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(out.stdout) == first, "seeds must not depend on the process (no salted hash())"


def test_support_pairs_come_from_the_other_images_nested_and_with_fresh_noise():
    dataset = load_dataset("embedded", crop=CROP)
    cond = Condition("gaussian_noise", "0.5", severity=0.5)
    params = task_params(cond, dataset.name, dataset.names[0], seed=0)
    support_x, support_y = support_set(dataset, 0, cond, params, shots=4, size=32, seed=0)
    assert support_x.shape == support_y.shape == (4, 3, 32, 32)

    def found_in(patch: torch.Tensor, image: torch.Tensor) -> bool:
        windows = (image.float() / 255).unfold(1, 32, 1).unfold(2, 32, 1)  # (3, h, w, 32, 32)
        return bool((windows - patch[:, None, None]).abs().amax(dim=(0, 3, 4)).min() < 1e-6)

    for patch in support_y:
        assert not found_in(patch, dataset.images[0]), "the query image is never a support image"
        assert any(found_in(patch, dataset.images[i]) for i in (1, 2))
    two_x, two_y = support_set(dataset, 0, cond, params, shots=2, size=32, seed=0)
    torch.testing.assert_close(two_y, support_y[:2])
    torch.testing.assert_close(two_x, support_x[:2])
    noise = support_x - support_y
    assert 0.5 < float(noise.std()) / params["sigma"] < 1.5  # same task: the query's noise level ...
    same_seed = degrade(cond, support_y, params) - support_y
    assert not torch.allclose(noise, same_seed)  # ... with a fresh realisation


def test_awgn_protocol_adds_exact_unclipped_noise():
    protocol = protocols.get("cbsd68-awgn")
    cond = [c for c in protocol.conditions() if c.level == "sigma=25"][0]
    clean = embedded_clean("astronaut", 128)
    params = task_params(cond, "CBSD68", "x.png", seed=0)
    assert params["sigma"] == 25 / 255
    noisy = registry_degrade(clean, "awgn", params)
    x = torch.from_numpy(clean).float().permute(2, 0, 1)[None]
    torch.testing.assert_close(degrade(cond, x, params)[0].permute(1, 2, 0).double(), torch.from_numpy(noisy))
    assert noisy.min() < 0 or noisy.max() > 1, "protocol noise is not clipped"
    assert abs((noisy - clean).std() / (25 / 255) - 1) < 0.03


def test_protocol_errors_and_measurement_helpers():
    with pytest.raises(protocols.ProtocolError, match="unknown protocol 'nope'"):
        protocols.get("nope")
    sr = protocols.get("set5-set14-sr")
    with pytest.raises(protocols.ProtocolError, match="needs --data"):
        sr.check_data([])
    with pytest.raises(protocols.ProtocolError, match="not one of them"):
        sr.check_data(["/somewhere/CBSD68"])
    sr.check_data(["/somewhere/set5", "/else/Set14"])
    assert {c.shave for c in sr.conditions()} == {2, 4} and all(c.y_channel for c in sr.conditions())
    white, black = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    assert torch.allclose(to_y(white), torch.full((1, 1, 2, 2), 235 / 255), atol=1e-4)
    assert torch.allclose(to_y(black), torch.full((1, 1, 2, 2), 16 / 255))
    assert torch.equal(quantize(torch.tensor([-0.2, 0.5, 0.1234, 1.3])) * 255, torch.tensor([0.0, 128, 31, 255]))
    from evaluation.commands import BASELINE_NAMES, PROTOCOL_NAMES

    assert PROTOCOL_NAMES.split(", ") == list(protocols.PROTOCOLS), "--help lists every protocol"
    assert sorted(BASELINE_NAMES.split(", ")) == baselines.names(), "--help lists every baseline"


@pytest.mark.parametrize("family, name, severity, gain", [
    ("gaussian_noise", "bm3d", 0.5, 3.0), ("poisson_noise", "bm3d", 0.6, 3.0), ("salt_pepper", "median", 0.5, 3.0),
    ("gaussian_blur", "wiener", 0.6, 1.0), ("gaussian_blur", "richardson_lucy", 0.6, 1.0),
    ("motion_blur", "wiener", 0.5, 0.5), ("motion_blur", "richardson_lucy", 0.5, 1.0),
    ("jpeg", "tv", 0.8, 0.1), ("downsample", "unsharp", 0.5, 0.1), ("low_light", "gamma", 0.6, 1.0),
    ("contrast", "stretch", 0.6, 1.0), ("haze", "dark_channel", 0.6, 1.0), ("inpainting", "biharmonic", 0.5, 3.0)])
def test_classical_baselines_restore(family, name, severity, gain):
    clean = embedded_clean("astronaut", 96)
    params = degradations.get(family).sample(severity, torch.Generator().manual_seed(3))
    degraded = registry_degrade(clean, family, params)
    x = torch.from_numpy(degraded).float().permute(2, 0, 1)[None]
    restored = baselines.run(name, family, x, params)[0].permute(1, 2, 0).double().numpy()
    before = peak_signal_noise_ratio(clean, degraded, data_range=1.0)
    after = peak_signal_noise_ratio(clean, restored, data_range=1.0)
    assert after > before + gain, f"{name} on {family}: {before:.2f} -> {after:.2f} dB"


def test_baseline_names_are_checked():
    assert baselines.parse("all") is None and baselines.parse("none") == []
    assert baselines.parse("bm3d,wiener") == ["bm3d", "wiener"]
    with pytest.raises(baselines.UnknownBaselineError, match="unknown baseline 'nlm'"):
        baselines.parse("bm3d,nlm")
    assert baselines.for_family("gaussian_noise", ["wiener"]) == []
    assert baselines.for_family("gaussian_noise+jpeg") == []


def test_bm3d_without_its_extra_is_named_by_its_extra_and_licence(monkeypatch):
    assert baselines.missing("bm3d") is None, "the dev extra installs bm3d"
    monkeypatch.setitem(sys.modules, "bm3d", None)  # what `import bm3d` sees when it is not installed
    with pytest.raises(baselines.MissingExtraError, match=r"metarestore\[baselines\].*non-commercial"):
        baselines.parse("wiener,bm3d")
    everything = baselines.parse("all")
    assert "bm3d" not in everything and set(everything) == set(baselines.names()) - {"bm3d"}
    assert baselines.for_family("gaussian_noise", everything) == []


def test_evaluate_bm3d_without_its_extra_is_one_error_line(workdir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bm3d", None)  # what `import bm3d` sees when it is not installed
    proc = cli_in_process(capsys, "evaluate", "--no-track", "--model", str(workdir / "m"), "--baselines", "bm3d")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: baseline 'bm3d' needs the optional extra: pip install 'metarestore[baselines]' "
        "(bm3d's licence: free for non-commercial use only)"]


# the CLI: one clear line for bad input -------------------------------------------------------------
def test_bad_input_gives_one_error_line(workdir, capsys):
    """Every check runs before the model is loaded (except the model's own), so no real model is needed.
    The last case runs as a process of its own (``python -m metarestore_cli``), the others in process."""
    (workdir / "empty").mkdir()
    model = str(workdir / "no-such-model")
    cases = {
        "image folder not found": ["--model", model, "--data", str(workdir / "missing")],
        "no images": ["--model", model, "--data", str(workdir / "empty")],
        "unknown degradation family 'fog'": ["--model", model, "--families", "gaussian_noise,fog"],
        "unknown protocol 'bsd1000'": ["--model", model, "--protocol", "bsd1000"],
        "protocol cbsd68-awgn needs --data": ["--model", model, "--protocol", "cbsd68-awgn"],
        "--adapter must be own (alias film) or auto": ["--model", model, "--adapter", "lora"],
        "--ensemble restores through the model": ["--model", model, "--adapter", "auto", "--shots", "0,3",
                                                  "--ensemble"],
        "model not found": ["--model", model],
    }
    *in_process, (last, last_args) = cases.items()
    results = {message: cli_in_process(capsys, "evaluate", "--no-track", *args) for message, args in in_process}
    results[last] = subprocess.run([sys.executable, "-m", "metarestore_cli", "evaluate", "--no-track", *last_args],
                                   cwd=workdir, capture_output=True, text=True, timeout=300)
    for message, result in results.items():
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2, (message, result.stderr[-2000:])
        assert len(errors) == 1 and message in errors[0], (message, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (workdir / "runs").exists(), "nothing is written for a bad request"


def test_told_rows_name_the_family_to_a_model_that_can_be_told_it(told_checkpoint):
    """--told: a family the model knows is named to it (rows "model (told)", its hint's output); another
    family stays blind (rows "model"), as does everything without --told."""
    from evaluation.conditions import grid_conditions
    from evaluation.methods import ModelSpec, Settings, Unit, run_unit
    from evaluation.metrics import score
    from metarestore.hub import load_learner
    from metarestore.inference import restore_blind

    learner, _ = load_learner(told_checkpoint)
    dataset = load_dataset("embedded", crop=CROP)
    spec = ModelSpec("model", "told", "told", None)
    for told in (True, False):
        settings = Settings(shots=[0], steps=[0], baselines=[], told=told)
        for cond in grid_conditions(["jpeg", "haze"], [0.5]):
            rows = run_unit(Unit(dataset.name, 0, cond), dataset, [(spec, learner)], settings)["rows"]
            named = told and cond.family == "jpeg"
            assert [r["method"] for r in rows] == ["identity", "model (told)" if named else "model"]
            params = task_params(cond, dataset.name, dataset.names[0], 0)
            clean = embedded_clean(dataset.names[0])
            x = torch.from_numpy(registry_degrade(clean, cond.family, params)).permute(2, 0, 1)[None].float()
            # blind: the default path (estimate, then what was found undone told, or the image as it is)
            expected = learner.restore(x, family="jpeg") if named else restore_blind(learner, x)
            target = torch.from_numpy(clean).permute(2, 0, 1)[None].float()
            assert rows[1]["psnr"] == pytest.approx(score(expected, target, cond, False)["psnr"], abs=1e-3)


def test_ensemble_rows_are_the_x8_restoration(told_checkpoint):
    """--ensemble: the model's rows are labelled "x8" and score restore_image(..., ensemble=True)."""
    from evaluation.conditions import grid_conditions
    from evaluation.methods import ModelSpec, Settings, Unit, run_unit
    from evaluation.metrics import score
    from metarestore.hub import load_learner
    from metarestore.inference import restore_image

    learner, _ = load_learner(told_checkpoint)
    dataset = load_dataset("embedded", crop=CROP)
    settings = Settings(shots=[0], steps=[0], baselines=[], told=True, ensemble=True)
    (cond,) = grid_conditions(["jpeg"], [0.5])
    rows = run_unit(Unit(dataset.name, 0, cond), dataset, [(ModelSpec("model", "m", "m", None), learner)],
                    settings)["rows"]
    assert [r["method"] for r in rows] == ["identity", "model (told) x8"]
    params = task_params(cond, dataset.name, dataset.names[0], 0)
    clean = embedded_clean(dataset.names[0])
    x = torch.from_numpy(registry_degrade(clean, cond.family, params)).permute(2, 0, 1)[None].float()
    target = torch.from_numpy(clean).permute(2, 0, 1)[None].float()
    expected = score(restore_image(learner, x, family="jpeg", ensemble=True), target, cond, False)["psnr"]
    assert rows[1]["psnr"] == pytest.approx(expected, abs=1e-3)
    single = score(restore_image(learner, x, family="jpeg"), target, cond, False)["psnr"]
    assert rows[1]["psnr"] != pytest.approx(single, abs=1e-3)


def test_auto_adapter_rows_fit_the_operator_a_server_would(smoke_model):
    """--adapter auto: the adapted rows are what a server's kind=auto adapter gives; on a strong colour cast
    (a held-out family) the fitted tone model lifts the image far above zero-shot, with no gradient step."""
    from evaluation.conditions import Condition
    from evaluation.methods import ModelSpec, Settings, Unit, run_unit
    from metarestore.hub import load_learner

    learner, _ = load_learner(smoke_model["checkpoint"])
    dataset = load_dataset("embedded", crop=CROP)
    settings = Settings(shots=[0, 3], steps=[0], baselines=[], support_size=48, adapter="auto")
    cond = Condition("color_cast", "0.8", severity=0.8)
    rows = run_unit(Unit(dataset.name, 1, cond), dataset, [(ModelSpec("model", "m", "m", None), learner)],
                    settings)["rows"]
    scores = {(r["method"], r["shots"]): r["psnr"] for r in rows}
    assert scores[("model", 3)] > scores[("model", 0)] + 3, scores


# real Ray + MLflow runs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(ray_local, smoke_model, tmp_path_factory):
    """The smoke model on the embedded images: a trained and a held-out family, shots 0 and 2, steps 0 and 3,
    every baseline, logged to the model's MLflow store. The same weights (from the checkpoint directory)
    also serve as the specialist and as the second model, so their rows must equal the model's."""
    from evaluation.runner import Request, evaluate

    out = tmp_path_factory.mktemp("eval") / "out"
    request = Request(model=smoke_model["model_uri"], data=["embedded"], families=["gaussian_noise", "haze"],
                      severities=[0.5], shots=[0, 2], steps=[0, 3], crop=CROP, support_size=32, out=out,
                      specialist_from=smoke_model["checkpoint"], compare=smoke_model["checkpoint"],
                      tracking_uri=smoke_model["tracking_uri"], progress=False)
    return evaluate(request), request


@pytest.mark.slow
def test_results_schema_and_rows(evaluated):
    result, _ = evaluated
    frame = pd.read_csv(result.files["results"])
    assert list(frame.columns) == COLUMNS
    # identity, baselines, model and second model (zero-shot + 2 shots x {0, 3} steps), specialist (adapted only)
    per_family = {f: 1 + len(baselines.for_family(f)) + 3 + 3 + 2 for f in ("gaussian_noise", "haze")}
    assert len(frame) == 3 * sum(per_family.values())  # 3 images
    assert set(frame["image"]) == {"astronaut", "coffee", "camera"}
    assert {"bm3d", "dark_channel"} <= set(frame["method"])
    assert set(frame.loc[frame["family"] == "haze", "family_role"]) == {"held_out"}
    assert set(frame.loc[frame["family"] == "gaussian_noise", "family_role"]) == {"trained"}
    model_rows = frame[frame["method"] == "model"]
    assert set(zip(model_rows["shots"], model_rows["steps"], strict=True)) == {(0, 0), (2, 0), (2, 3)}
    assert set(model_rows["model"]) == {"smoke/1"}
    specialist = frame[frame["method"] == "specialist"]
    assert set(zip(specialist["shots"], specialist["steps"], strict=True)) == {(2, 0), (2, 3)}
    assert set(frame["method"]) == {"identity", "bm3d", "dark_channel", "model", "specialist", "smoke"}
    assert "not a multitask one" in " ".join(result.notes)
    assert frame[["psnr", "ssim"]].notna().all().all() and (frame["crop"] == CROP).all()
    assert frame["lpips"].isna().all() == ("LPIPS skipped" in " ".join(result.notes))


@pytest.mark.slow
def test_identity_rows_equal_an_independent_psnr_of_the_degraded_inputs(evaluated):
    result, _ = evaluated
    frame = pd.read_csv(result.files["results"])
    identity = frame[frame["method"] == "identity"]
    assert len(identity) == 6
    for row in identity.itertuples():
        params = json.loads(row.params)
        clean = embedded_clean(row.image)
        expected = peak_signal_noise_ratio(clean, registry_degrade(clean, row.family, params), data_range=1.0)
        assert row.psnr == pytest.approx(expected, abs=2e-3), (row.image, row.family)
    sigmas = [json.loads(p)["sigma"] for p in identity.loc[identity["family"] == "gaussian_noise", "params"]]
    spec = degradations.get("gaussian_noise").specs["sigma"]
    assert all(spec.at(0.4) - 1e-9 <= s <= spec.at(0.6) + 1e-9 for s in sigmas), "severity 0.5 (+-0.1 jitter)"


@pytest.mark.slow
def test_every_method_sees_the_same_inputs(evaluated, tmp_path):
    result, request = evaluated
    frame = pd.read_csv(result.files["results"])
    model_rows = frame[frame["method"] == "model"].set_index(["image", "family", "shots", "steps"])["psnr"]
    identity = frame[frame["method"] == "identity"].drop_duplicates(["image", "family"]).set_index(
        ["image", "family"])["psnr"]
    for image, family in {(i, f) for i, f, _, _ in model_rows.index}:
        # steps 0 goes through adapt() and the adapted forward: the model's blind pass on the same input. The
        # zero-shot row is the default blind path: that same pass where the estimator found something (this
        # model takes no hint), the input itself where it found nothing
        zero, unadapted = model_rows[(image, family, 0, 0)], model_rows[(image, family, 2, 0)]
        left_as_is = zero == pytest.approx(identity[(image, family)], abs=1e-4)
        assert unadapted == pytest.approx(zero, abs=1e-4) or left_as_is
    # the specialist and the second model have the same weights here: same inputs and support -> same numbers
    for other in ("specialist", "smoke"):
        rows = frame[frame["method"] == other].set_index(["image", "family", "shots", "steps"])["psnr"]
        assert len(rows) > 0
        for key, value in rows.items():
            assert value == pytest.approx(model_rows[key], abs=1e-4), (other, key)
    # a second, smaller run (another Ray task layout) degrades exactly the same inputs
    from evaluation.runner import Request, evaluate

    again = evaluate(Request(model=request.model, data=["embedded"], families=["haze"], severities=[0.5],
                             shots=[0], steps=[0], baselines="dark_channel", crop=CROP, out=tmp_path / "again",
                             tracking_uri=request.tracking_uri, track=False, progress=False))
    first = frame[frame["family"] == "haze"].set_index(["image", "method", "shots", "steps"])
    for row in again.results.itertuples():
        match = first.loc[(row.image, row.method, row.shots, row.steps)]
        assert row.params == match["params"]
        assert row.psnr == pytest.approx(match["psnr"], abs=1e-6)


@pytest.mark.slow
def test_report_files_and_mlflow_run(evaluated, smoke_model):
    result, _ = evaluated
    out = result.out
    for name in ("results.csv", "summary.csv", "summary.md", "report.html", "plots/adaptation.png",
                 "plots/methods.png", "examples/embedded__gaussian_noise.png", "examples/embedded__haze.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "smoke/1" in page
    summary = (out / "summary.md").read_text()
    assert ("| identity | bm3d | dark_channel | model | model 2-shot 3-step | specialist 2-shot 3-step | smoke | "
            "smoke 2-shot 3-step |") in summary
    assert "### embedded / haze / model" in summary

    client = mlflow.tracking.MlflowClient(smoke_model["tracking_uri"])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "metarestore-eval"
    assert run.data.params["model_name"] == "smoke" and run.data.params["model_version"] == "1"
    assert run.data.params["model_uri"] == smoke_model["model_uri"]
    assert run.data.params["specialist_uri"] == run.data.params["smoke_uri"] == smoke_model["checkpoint"]
    assert run.data.tags["metarestore.model_version"] == "1"
    history = client.get_metric_history(result.run_id, "psnr/embedded/haze/0.5/model/shots2")
    assert sorted(m.step for m in history) == [0, 3], "adaptation steps are the metric steps"
    logged = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"results.csv", "summary.md", "report.html", "plots", "examples"} <= logged


@pytest.mark.slow
def test_awgn_protocol_end_to_end_on_a_small_cbsd68_folder(ray_local, smoke_model, workdir):
    """The protocol path (fixed sigmas, unclipped noise, 8-bit outputs, full images) on two real photographs
    in a folder named like the benchmark; identity checked independently."""
    folder = workdir / "CBSD68"
    folder.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(skimage.data, name)()[:80, :96]).save(folder / f"{name}.png")
    from evaluation.runner import Request, evaluate

    result = evaluate(Request(model=smoke_model["checkpoint"], data=[str(folder)], protocol="cbsd68-awgn",
                              shots=[0], steps=[0], baselines="none", out=workdir / "out", track=False,
                              progress=False))
    frame = result.results
    assert list(frame["severity"].unique()) == ["sigma=15", "sigma=25", "sigma=50"]
    assert (frame["protocol"] == "cbsd68-awgn").all() and (frame["crop"] == 0).all()
    assert set(frame["method"]) == {"identity", "model"} and (frame["height"] == 80).all()
    for row in frame[frame["method"] == "identity"].itertuples():
        clean = np.asarray(Image.open(folder / row.image)).astype(np.float64) / 255.0
        noisy = registry_degrade(clean, "awgn", json.loads(row.params))
        eight_bit = np.round(np.clip(noisy, 0, 1) * 255) / 255
        assert row.psnr == pytest.approx(peak_signal_noise_ratio(clean, eight_bit, data_range=1.0), abs=2e-3)


def test_showcase_summary_counts_only_clear_gains_and_names_the_losses():
    from evaluation.showcase import format_rows

    rows = [{"family": "jpeg", "held_out": False, "psnr_input": 30.0, "psnr_restored": 30.2},
            {"family": "gaussian_noise", "held_out": False, "psnr_input": 20.0, "psnr_restored": 28.0},
            {"family": "contrast", "held_out": False, "psnr_input": 25.0, "psnr_restored": 24.7},
            {"family": "haze", "held_out": True, "psnr_input": 12.0, "psnr_restored": 11.0, "psnr_adapted": 12.6}]
    text = format_rows(rows).splitlines()
    assert text[-2] == "improved by >= 0.5 dB: 2 of 4 families"
    assert text[-1] == "worse than the input: contrast (-0.30 dB)"


def test_showcase_tells_a_model_the_families_it_knows(told_checkpoint, tmp_path):
    """A model that can be told the degradation restores each trained family told (the row says so), the
    held-out ones blind; the table marks them."""
    from evaluation.showcase import format_rows, showcase
    from metarestore.hub import load_learner

    learner, metadata = load_learner(told_checkpoint)
    rows = showcase(learner, metadata, tmp_path, size=64, shots=2, steps=1)
    assert {r["family"]: r["told"] for r in rows} == {
        **{f: True for f in metadata["families"]["train"]}, **{f: False for f in metadata["families"]["held_out"]}}
    assert "jpeg (told)" in format_rows(rows) and (tmp_path / "showcase.png").exists()
