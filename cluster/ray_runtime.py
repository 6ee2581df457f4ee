"""The one place that starts or joins Ray, for training, search, evaluation, serving and the tests.

It lives in ``cluster`` (the package about Ray clusters), which every upper package may import and which
imports none of them back.
"""

from __future__ import annotations

import os
import socket
from typing import Any


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
    if address:
        ray.init(address=address, **kwargs)
        return True
    port = free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    # "local": always a new in-process Ray, never silently joining a cluster someone else started
    ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
    return True
