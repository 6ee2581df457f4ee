"""MLflow tracking against a real ``mlflow server`` on 127.0.0.1: a server down at start is a clear
error within seconds; an outage mid-run does not kill training, and what was queued is sent later."""

from __future__ import annotations

import time
import warnings

import mlflow
import pytest

from conftest import smoke_config, start_mlflow_server, stop_process_group
from metarestore.engine import MetaTrainer
from metarestore.loop import LoopHooks, run_loop
from metarestore.tracking import RunLogger, TrackingError, check_reachable
from metarestore.train_local import train_local

pytestmark = pytest.mark.slow


def test_server_down_at_start_is_a_clear_error_within_seconds(workdir):
    start = time.time()
    with pytest.raises(TrackingError, match="not reachable"):
        train_local(smoke_config(workdir / "out"), tracking_uri="http://127.0.0.1:9")
    assert time.time() - start < 10
    assert not (workdir / "out").exists(), "nothing was trained or written"


def test_outage_mid_run_does_not_kill_training(workdir):
    proc, uri = start_mlflow_server(workdir / "server")
    port = int(uri.rsplit(":", 1)[1])
    try:
        check_reachable(uri)
        cfg = smoke_config(workdir / "out", "train.steps=30", "train.log_every=2", "train.val_every=30",
                           "train.checkpoint_every=30")
        trainer = MetaTrainer(cfg, device="cpu")
        logger = RunLogger(uri, cfg.tracking.experiment, "outage")
        events = {}

        def outage(step: int) -> None:
            nonlocal proc
            if step == 8:  # the server dies after four metric batches went through
                stop_process_group(proc)
                events["down"] = step
            if step == 20:  # ... and comes back: queued calls are sent in order
                proc, _ = start_mlflow_server(workdir / "server", port=port)
                events["up"] = step

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_loop(trainer, LoopHooks(chief=True, after_step=outage), logger, progress=False)
            assert logger.finish()
        assert events == {"down": 8, "up": 20} and trainer.step == 30
        assert any("MLflow logging failed" in str(w.message) for w in caught)

        history = mlflow.tracking.MlflowClient(uri).get_metric_history(logger.run_id, "meta_loss")
        assert sorted(m.step for m in history) == list(range(2, 31, 2)), "nothing logged was lost"
        assert mlflow.tracking.MlflowClient(uri).get_run(logger.run_id).info.status == "FINISHED"
    finally:
        stop_process_group(proc)


def test_registering_and_loading_leave_mlflow_globals_untouched(smoke_model, workdir):
    """Registering or fetching a model must not re-point this process (or its subprocesses) at that store:
    a later client for another store would otherwise read the wrong registry."""
    import os

    from metarestore.hub import resolve

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_REGISTRY_URI")
    resolve(smoke_model["model_uri"], smoke_model["tracking_uri"])
    after = mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_REGISTRY_URI")
    assert after == before
    assert smoke_model["tracking_uri"] not in (os.environ.get("MLFLOW_REGISTRY_URI"), mlflow.get_registry_uri())
    other = f"sqlite:///{workdir / 'other.db'}"
    assert mlflow.tracking.MlflowClient(other).search_registered_models() == []


def test_chain_names_reach_mlflow_and_a_refused_call_never_blocks_the_rest(workdir):
    """A chain family (``gaussian_noise+jpeg``) in a param or metric key is logged under a key MLflow takes;
    a call the store refuses for good (an invalid key) is dropped with a warning, and what follows it is
    still logged."""
    uri = f"sqlite:///{workdir}/mlflow.db"
    logger = RunLogger(uri, "keys", "chains")
    logger.params({"families.weights.gaussian_noise+jpeg": 2.0})
    logger.metrics({"train/loss/gaussian_noise+jpeg": 0.5}, step=1)
    logger.pending.append(lambda: logger.client.log_param(logger.run_id, "bad key?!", 1))
    with pytest.warns(UserWarning, match="refused"):
        logger.flush()
    logger.metrics({"after": 1.0}, step=2)
    run = mlflow.tracking.MlflowClient(uri).get_run(logger.run_id)
    assert run.data.params == {"families.weights.gaussian_noise_then_jpeg": "2.0"}
    assert run.data.metrics == {"train/loss/gaussian_noise_then_jpeg": 0.5, "after": 1.0}
    assert not logger.pending


def test_registering_prints_no_mlflow_lines(smoke_model, workdir, capfd):
    """The console is the project's: MLflow's "Successfully registered model" and "Created version" lines (the
    caller says "registered: models:/...") and its signature warning stay out of it."""
    from metarestore.tracking import register_checkpoint

    uri = f"sqlite:///{workdir / 'quiet.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("quiet")).info.run_id
    capfd.readouterr()
    assert register_checkpoint(uri, run_id, smoke_model["checkpoint"], "quiet-model") == "1"
    assert register_checkpoint(uri, run_id, smoke_model["checkpoint"], "quiet-model") == "2"  # "already exists"
    printed = capfd.readouterr()
    for line in ("registered model", "Registered model", "Created version", "infer model signature"):
        assert line not in printed.out + printed.err, printed
