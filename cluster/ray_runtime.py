"""The one place that starts or joins Ray, for training, search, evaluation, serving and the tests.

It lives in ``cluster`` (the package about Ray clusters), which every upper package may import and which
imports none of them back.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

# Ray streams the output of every process it runs to the driver's console. These are Ray's own processes:
# their lines stay in Ray's log directory (named once when Ray starts), so the console shows this project's
# lines (training steps, results). METARESTORE_RAY_LOGS=all shows everything again.
RAY_OWN_PROCESSES = ("TrainController", "ServeController", "ProxyActor", "PreemptionWatcher", "PlacementGroupCleaner",
                     "raylet", "autoscaler", "gcs_server", "dashboard")
RAY_OWN_LINES = ("core_worker.cc", "Reporting training result", "Checkpoint successfully created",
                 "Setting up process group",  # printed by Ray inside our workers
                 # the raylet's note that more workers started than cores: a search's trials each start a Train
                 # controller and workers, as they should (the raylet's other messages, a worker killed, stay)
                 "worker processes have been started on node")
TRAIN_WORKER = "RayTrainWorker"  # Ray Train's actor around our train_func


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> bool:
    """Join ``address`` (auto, ray://..., HOST:PORT) or start a new local Ray in this process; True when
    this call connected (so the caller may shut it down), False when Ray was already initialised.

    A local Ray gets a GCS port chosen here and exported as ``RAY_ADDRESS`` before it starts, so its
    processes inherit it: Ray Train's placement-group cleaner (State API) then finds *this* cluster
    even when other Ray instances run on the machine (otherwise it gives up, and trials that ASHA stops
    early leak their workers' resources).
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs.setdefault("log_to_driver", True)
    everything = os.environ.get("METARESTORE_RAY_LOGS") == "all"
    if not everything:
        kwargs.setdefault("logging_level", logging.ERROR)  # Ray's start-up INFO/WARNING lines: in its logs
    if address:
        ray.init(address=address, **kwargs)
        what = f"joined the Ray cluster at {address}"
    else:
        port = free_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        # "local": always a new in-process Ray, never silently joining a cluster someone else started
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
        what = f"started a local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs, token authentication on)"
    if not everything and kwargs["log_to_driver"]:
        _project_lines_only()
    if os.environ.get("NO_COLOR") or not sys.stdout.isatty():
        # Ray colours the "(RayTrainWorker pid=...)" prefix of streamed lines even into a file or a pipe
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    print(f"{what}; Ray's own logs: {_log_dir()}", file=sys.stderr, flush=True)
    return True


def _log_dir() -> str:
    try:
        from ray._private.worker import _global_node

        return os.path.join(_global_node.get_session_dir_path(), "logs")
    except (ImportError, AttributeError):  # a Ray without that internal: its default place
        return "/tmp/ray/session_latest/logs"


def _project_lines_only() -> None:
    """Replace Ray's printer of streamed process output with one that drops Ray's own processes and the
    lines Ray prints inside ours. Uses Ray's internal dispatcher; on a Ray without it, everything is printed."""
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        printer = ray_worker.print_to_stdstream
        printer = getattr(printer, "__wrapped__", printer)  # Ray's own, once more after a second init_ray
    except (ImportError, AttributeError):
        return

    def filtered(data: dict, ignore_prefix: bool) -> None:  # also the raylet's messages, which Ray prints directly
        lines = [line for line in data.get("lines", []) if not any(own in line for own in RAY_OWN_LINES)]
        if lines:
            printer({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    def emit(data: dict) -> None:
        source = f"{data.get('actor_name') or ''} {data.get('task_name') or ''} {data.get('pid')}"
        if any(name in source for name in RAY_OWN_PROCESSES):
            return
        # a training worker's lines are the run's progress: without Ray's "(RayTrainWorker pid=...)"
        filtered(data, ignore_prefix or TRAIN_WORKER in source)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", emit)
    filtered.__wrapped__ = printer
    ray_worker.print_to_stdstream = filtered
