"""The metarestore command as a new user meets it: help, families, degrade, restore, train --local,
and one clear line (no traceback, exit 2) for every mistake."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import CONFIGS, cli_in_process
from metarestore_cli.app import app

CLI = str(Path(sys.executable).with_name("metarestore"))


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_every_command_has_useful_help():
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    names += [g.name for g in app.registered_groups]
    assert {"families", "degrade", "train", "restore", "tune"} <= set(names)
    for name in names:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Usage:" in result.output and len(result.output.splitlines()) > 4, name


def test_families_json_lists_every_family_with_ranges():
    result = CliRunner().invoke(app, ["families", "--json"])
    from metarestore import degradations

    families = json.loads(result.output)
    names = [f["name"] for f in families]
    assert len(names) >= 12 and {"gaussian_noise", "jpeg", "haze", "inpainting"} <= set(names)
    assert families == [degradations.get(n).describe() for n in degradations.names()]  # the registry, in order
    plain = CliRunner().invoke(app, ["families"]).output
    assert [line.split()[0] for line in plain.splitlines() if not line.startswith(" ")] == names


def test_degrade_writes_a_degraded_image_of_the_same_size(clean_image, workdir, capsys):
    from metarestore.data import read_image
    from metarestore.meta import psnr

    out = workdir / "out.png"
    result = run("degrade", str(clean_image), "-o", str(out), "--family", "jpeg", "--severity", "0.5")
    assert result.returncode == 0, result.stderr
    clean, degraded = read_image(clean_image)[0], read_image(out)[0]
    assert degraded.shape == clean.shape
    value = psnr(degraded[None] / 255.0, clean[None] / 255.0)
    assert 20 < value < 40
    again = workdir / "again.png"  # in this process: the same output in another process, so seeded
    assert cli_in_process(capsys, "degrade", str(clean_image), "-o", str(again), "--family", "jpeg",
                          "--severity", "0.5").returncode == 0
    assert np.array_equal(read_image(again)[0].numpy(), degraded.numpy()), "seeded: the same output"


def test_user_mistakes_are_one_line(clean_image, workdir, capsys):
    # the installed command once (exit status and stderr of a real process); every other mistake in process
    assert_one_line_error(run("degrade", "missing.png", "-o", "x.png", "--family", "jpeg"), "image not found")

    def mistake(*args: str) -> subprocess.CompletedProcess:
        return cli_in_process(capsys, *args)

    assert_one_line_error(mistake("degrade", str(clean_image), "-o", "x.png", "--family", "gaussian_blur+awgn"),
                          "outside [0, 1]")  # a PNG would hold gaussian_noise's clipped values instead
    assert not (workdir / "x.png").exists()
    assert_one_line_error(mistake("degrade", str(clean_image), "-o", "x.png", "--family", "fog"),
                          "unknown degradation family 'fog'")
    bad = workdir / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    assert_one_line_error(mistake("train", "--local", "--config", str(bad)), "unknown config key train.'stepz'")
    assert_one_line_error(mistake("train", "--local", "--config", "nope.yaml"), "config file not found")
    assert_one_line_error(mistake("restore", str(clean_image), "-o", "x.png", "--model", "no/such/dir"),
                          "model not found")
    assert_one_line_error(mistake("restore", str(clean_image), "-o", "x.png", "--model", str(workdir)),
                          "no metarestore checkpoint")
    result = mistake("degrade", str(clean_image), "-o", "x.png", "--family", "jpeg", "--severity", "3")
    assert result.returncode == 2 and "Traceback" not in result.stderr  # click's own range check
    assert not (workdir / "x.png").exists(), "nothing is written for a mistake"


def test_restore_with_a_checkpoint_and_with_a_registered_model(smoke_model, clean_image, workdir, capsys):
    from metarestore.data import read_image

    degraded = workdir / "noisy.png"
    assert cli_in_process(capsys, "degrade", str(clean_image), "-o", str(degraded), "--family", "gaussian_noise",
                          "--severity", "0.6").returncode == 0
    # the installed command once (a registered model's alias); every other kind of URI in process
    out = workdir / "restored.png"
    result = run("restore", str(degraded), "-o", str(out), "--model", "models:/smoke@latest",
                 "--tracking-uri", smoke_model["tracking_uri"])
    assert result.returncode == 0, result.stderr
    assert read_image(out)[0].shape == read_image(degraded)[0].shape
    for model in (smoke_model["checkpoint"], smoke_model["model_uri"], f"runs:/{smoke_model['run_id']}/checkpoint"):
        out.unlink()
        result = cli_in_process(capsys, "restore", str(degraded), "-o", str(out), "--model", model,
                                "--tracking-uri", smoke_model["tracking_uri"])
        assert result.returncode == 0, (model, result.stderr)
        assert read_image(out)[0].shape == read_image(degraded)[0].shape


def test_restore_told_the_degradation(told_checkpoint, perturbed_smoke_checkpoint, clean_image, workdir, capsys):
    """--degradation reaches a model that can be told it (the output is its row's), and is one error line
    for a blind model, a family the model does not know, or one no image file can show (awgn); nothing is
    written for a mistake."""
    import torch

    from metarestore.data import read_image
    from metarestore.hub import load_learner
    from metarestore.inference import restore_image

    info = json.loads(cli_in_process(capsys, "info", told_checkpoint).stdout)
    assert info["degradations"] == ["gaussian_noise", "gaussian_blur", "jpeg", "low_light"]  # not awgn
    learner, _ = load_learner(told_checkpoint)
    x = read_image(clean_image)[0][None].float() / 255
    outputs = {}
    for family in ("jpeg", "gaussian_blur"):
        out = workdir / f"{family}.png"
        result = cli_in_process(capsys, "restore", str(clean_image), "-o", str(out), "--model", told_checkpoint,
                                "--degradation", family)
        assert result.returncode == 0, result.stderr
        outputs[family] = read_image(out)[0][None].float() / 255
        expected = restore_image(learner, x, family=family)
        assert (outputs[family] - expected).abs().max() <= 0.51 / 255
    assert not torch.equal(outputs["jpeg"], outputs["gaussian_blur"])
    assert_one_line_error(cli_in_process(capsys, "restore", str(clean_image), "-o", "x.png", "--model",
                                         told_checkpoint, "--degradation", "haze"), "knows gaussian_noise")
    assert_one_line_error(cli_in_process(capsys, "restore", str(clean_image), "-o", "x.png", "--model",
                                         told_checkpoint, "--degradation", "awgn"), "outside [0, 1]")
    assert_one_line_error(cli_in_process(capsys, "restore", str(clean_image), "-o", "x.png", "--model",
                                         perturbed_smoke_checkpoint, "--degradation", "jpeg"), "trained blind")
    assert not (workdir / "x.png").exists()


def test_restore_blind_says_what_it_found_and_leaves_a_clean_photo_untouched(told_checkpoint, clean_image, workdir,
                                                                            capsys):
    """No --degradation: the estimator reads the file. A clean photo comes back pixel for pixel and the
    command says so; a JPEG file is found to be JPEG at the quality it was saved with, and what comes back
    is the model told JPEG."""
    import torch
    from PIL import Image

    from metarestore.data import read_image
    from metarestore.hub import load_learner
    from metarestore.inference import restore_image

    out = workdir / "same.png"
    result = cli_in_process(capsys, "restore", str(clean_image), "-o", str(out), "--model", told_checkpoint)
    assert result.returncode == 0, result.stderr
    assert "found: clean" in result.stdout and "left as it is" in result.stdout, result.stdout
    assert torch.equal(read_image(out)[0], read_image(clean_image)[0])
    jpeg = workdir / "photo.jpg"
    Image.open(clean_image).save(jpeg, quality=20)
    out = workdir / "dejpeg.png"
    result = cli_in_process(capsys, "restore", str(jpeg), "-o", str(out), "--model", told_checkpoint)
    assert result.returncode == 0, result.stderr
    assert "found: jpeg (p=1.00, quality 20)" in result.stdout and "undid jpeg" in result.stdout, result.stdout
    learner, _ = load_learner(told_checkpoint)
    x = read_image(jpeg)[0][None].float() / 255
    got = read_image(out)[0][None].float() / 255
    y = x
    for family in re.search(r"undid ([a-z_ ]+)", result.stdout).group(1).split(" then "):  # jpeg first
        y = restore_image(learner, y, family=family.strip())
    assert (got - y).abs().max() <= 0.51 / 255


def test_restore_with_the_x8_ensemble(told_checkpoint, clean_image, workdir, capsys):
    """--ensemble: the image restored as the mean over its eight rotations and flips (what restore_image
    gives with ensemble=True) and said so; with --endpoint it is one error line."""
    from metarestore.data import read_image
    from metarestore.hub import load_learner
    from metarestore.inference import restore_image

    learner, _ = load_learner(told_checkpoint)
    x = read_image(clean_image)[0][None].float() / 255
    out = workdir / "x8.png"
    result = cli_in_process(capsys, "restore", str(clean_image), "-o", str(out), "--model", told_checkpoint,
                            "--degradation", "jpeg", "--ensemble")
    assert result.returncode == 0, result.stderr
    assert "x8 ensemble" in result.stdout
    got = read_image(out)[0][None].float() / 255
    assert (got - restore_image(learner, x, family="jpeg", ensemble=True)).abs().max() <= 0.51 / 255
    assert (got - restore_image(learner, x, family="jpeg")).abs().max() > 0.51 / 255
    assert_one_line_error(cli_in_process(capsys, "restore", str(clean_image), "-o", "y.png", "--endpoint",
                                         "http://127.0.0.1:9", "--ensemble"), "--ensemble needs a local model")
    assert not (workdir / "y.png").exists()


def test_train_local_logs_params_metrics_and_checkpoint(smoke_model):
    client = mlflow.tracking.MlflowClient(smoke_model["tracking_uri"])
    logged = client.get_run(smoke_model["run_id"])
    assert logged.info.status == "FINISHED"
    assert logged.data.params["mode"] == "local" and logged.data.params["train.steps"] == "60"
    assert {"meta_loss", "val/psnr_adapted", "val/psnr_adapted/haze", "loss/jpeg"} <= set(logged.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(smoke_model["run_id"])}
    assert {"checkpoint", "config.yaml"} <= artifacts
    history = client.get_metric_history(smoke_model["run_id"], "meta_loss")
    assert [m.step for m in history] == list(range(10, 61, 10))


@pytest.mark.parametrize("name", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_shipped_configs_are_valid(name, tmp_path):
    from metarestore.config import dump, load_config

    cfg = load_config(CONFIGS / name)  # raises on an unknown key or a bad value
    written = tmp_path / name  # what a run writes as its config.yaml must train the same run again
    written.write_text(dump(cfg))
    assert load_config(written) == cfg
