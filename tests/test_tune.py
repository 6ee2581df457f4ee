"""Ray Tune search: the space is checked before any trial; a killed search resumes without rerunning
finished trials; results (CSV, best.yaml, plots) and MLflow parent/child runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from conftest import CONFIGS, cli_in_process
from metarestore.config import ConfigError, load_config
from training.search_space import parse_search

CLI = str(Path(sys.executable).with_name("metarestore"))


def base_with(space: dict, **search) -> dict:
    base = yaml.safe_load((CONFIGS / "tune-smoke.yaml").read_text())
    base["search"] = {**base["search"], **search, "space": space}
    return base


def test_task_weights_expand_to_every_training_family():
    spec = parse_search(base_with({"task_weights": {"loguniform": [0.5, 2.0]}}))
    assert sorted(spec.space) == sorted(f"families.weights.{f}" for f in
                                        ["gaussian_noise", "gaussian_blur", "jpeg", "low_light"])


@pytest.mark.parametrize(("space", "message"), [
    ({"train.nope": {"uniform": [0, 1]}}, "unknown config key train.'nope'|unknown config key"),
    ({"train.outer_lr": {"loguniform": [0.01, 0.001]}}, "empty or inverted range"),
    ({"train.outer_lr": {"uniform": [0.1, 0.1]}}, "empty or inverted range"),
    ({"families.weights.fog": {"uniform": [0.5, 1]}}, "unknown degradation family 'fog'"),
    ({"meta.algorithm": {"choice": ["fomaml", "magic"]}}, "meta.algorithm must be one of"),
    ({"meta.inner_lr.default": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
    ({"meta.inner_lr.default": {"loguniform": [0, 1]}}, "positive range"),
    ({"meta.inner_lr.head": {"loguniform": [0.001, 0.1]}}, "unknown group"),
])
def test_bad_search_space_fails_before_any_trial(space, message):
    with pytest.raises(ConfigError, match=message):
        parse_search(base_with(space))


def test_bad_search_config_is_one_line_from_the_cli(workdir, capsys):
    bad = workdir / "bad.yaml"
    bad.write_text(yaml.safe_dump(base_with({"families.weights.fog": {"uniform": [0.5, 1]}})))
    run = cli_in_process(capsys, "tune", "--config", str(bad), "--out", str(workdir / "out"))
    assert run.returncode == 2
    assert run.stderr.strip().startswith("error: ") and "fog" in run.stderr and "Traceback" not in run.stderr
    assert not (workdir / "out").exists(), "nothing was started"


def test_best_yaml_is_a_plain_experiment(workdir):
    """best.yaml must be trainable as is: no search section, values applied (checked without Ray)."""
    from training.search_space import trial_config

    base = base_with({"task_weights": {"loguniform": [0.5, 2.0]}})
    cfg = trial_config(base, {"families.weights.jpeg": 1.7, "name": "x-best"})
    assert cfg.families.weight("jpeg") == 1.7 and cfg.search == {}


def _terminated_trials(out: Path) -> set[str]:
    done = set()
    for state in (out / "ray_tune" / "search").glob("experiment_state-*.json"):
        try:
            for trial_json, _ in json.loads(state.read_text())["trial_data"]:
                trial = json.loads(trial_json)
                if trial["status"] == "TERMINATED":
                    done.add(trial["trial_id"])
        except (json.JSONDecodeError, KeyError, ValueError):
            continue
    return done


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(workdir, tracking_uri):
    """Also trains from a folder given relative to the caller's directory: trials run in their own."""
    import skimage.data
    from PIL import Image

    (workdir / "photos").mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).save(workdir / "photos" / f"{name}.png")
    out = workdir / "search"
    command = [CLI, "tune", "--config", str(CONFIGS / "tune-smoke.yaml"), "--out", str(out),
               "--tracking-uri", tracking_uri, "--set", "data.train=photos",
               # 3 trials of 20 steps: after the kill, the unfinished ones rerun in one round of 2 at once
               "--set", "search.num_samples=3", "--set", "train.steps=20"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    ray_processes: list[int] = []
    try:
        deadline = time.time() + 600  # about 1 min on a quiet machine
        while not _terminated_trials(out) and time.time() < deadline and driver.poll() is None:
            ray_processes = sorted(set(ray_processes) | set(_children(driver.pid)))
            time.sleep(1)
        finished_before = _terminated_trials(out)
        assert finished_before, "a trial finished before the kill"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in ray_processes:  # the driver's own Ray (GCS, raylet, dashboard) dies with it; make sure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    started_before = (out / "trials" / "started.log").read_text().split("\n")

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    starts = [line.split()[0] for line in (out / "trials" / "started.log").read_text().splitlines()]
    for trial_id in finished_before:
        assert starts.count(trial_id) == 1, f"finished trial {trial_id} was not rerun"
    assert len(started_before) >= 1

    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 3 and set(finished_before) <= set(trials.trial_id)
    assert {"trial_id", "status", "stopped_early", "objective", "duration_s"} <= set(trials.columns)
    assert any(c.startswith("config/families.weights.") for c in trials.columns)
    assert (out / "objective.png").stat().st_size > 0 and (out / "importance.png").stat().st_size > 0

    best = load_config(out / "best.yaml")  # trainable as is: a valid experiment without a search section
    assert best.search == {} and best.name == "tune-smoke-best"
    assert best.data.train == str((workdir / "photos").resolve())
    assert "best:" in resumed.stdout
    # the console: this project's lines per trial report, not Tune's status tables
    assert re.search(r"trial \w+ step \d+: val/psnr_adapted [\d.]+ \| best", resumed.stdout), resumed.stdout[-2000:]
    assert "Trial status" not in resumed.stdout and "╭" not in resumed.stdout
    console = resumed.stdout + resumed.stderr  # nor the trials' own step lines, nor Ray's processes'
    assert not re.search(r"step \d+/\d+", console) and "PlacementGroupCleaner" not in console, console[-2000:]
    assert "(raylet)" not in console and "RayTrainWorker" not in console, console[-2000:]

    client = mlflow.tracking.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("metarestore-tune")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mode") == "tune-parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 3
    assert all("val/psnr_adapted" in r.data.metrics for r in children)
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"trials.csv", "best.yaml",
                                                                               "objective.png", "importance.png"}


def test_default_point_is_the_base_configs_own_values():
    from training.search_space import default_point

    base = base_with({"task_weights": {"loguniform": [0.5, 2.0]}, "meta.inner_lr.decoder": {"loguniform": [1e-3, 1]},
                      "train.outer_lr": {"loguniform": [1e-4, 1e-2]}}, include_default=True)
    base["families"]["weights"] = {"jpeg": 2.0}
    point = default_point(base, parse_search(base))
    assert point["families.weights.jpeg"] == 2.0 and point["families.weights.low_light"] == 1.0
    assert point["meta.inner_lr.decoder"] == 0.02 and point["train.outer_lr"] == 0.003


@pytest.mark.parametrize("name", ["tune-smoke.yaml", "tune-cbsd432.yaml", "meta-ab.yaml"])
def test_shipped_search_configs_parse(name):
    spec = parse_search(yaml.safe_load((CONFIGS / name).read_text()))
    assert spec.num_samples >= 4 and spec.space
