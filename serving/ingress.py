"""Ray Serve's direct ingress: clients reach the Restorer replica's own HTTP server, skipping the proxy.

Through Serve's proxy a request costs a hop (proxy -> replica by Ray RPC, ~13 ms at 256x256 on 2 cores) and
the replica then calls back into the proxy to read the body (~4.5 ms). With direct ingress (Ray 2.60,
``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``) each replica of the ingress deployment also runs its own uvicorn
server on a port Ray picks from 30000-31000, bound to ``http_options.host`` (127.0.0.1 here); the proxy
keeps answering at the usual port. The same FastAPI app (middleware, error handlers, forms) serves both.

``metarestore serve`` turns it on by default for one local replica and gives that replica the command's
``--port`` (``enable_direct_ingress(port=...)``: Ray's port range narrowed to that one port, its quarantine
of released ports off, so that a replacement replica may bind the same port); the proxy then listens on a
free port of its own. The trade-offs: one replica is one URL (several replicas need a load
balancer in front of their ports: Ray's HAProxy mode, which binds every interface and is not a default
here), and the URL answers only while the replica runs (a replica being replaced while its predecessor
still holds the port cannot bind it: Ray then blocks the port, and only the proxy's URL answers until the
command restarts). The environment must be set before Ray starts: every Serve process reads it at import.
"""

from __future__ import annotations

import os
import time
from collections.abc import MutableMapping

ENABLE = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
# How long a stopping replica keeps serving so that a load balancer can drop it (Ray's default: 30 s, which
# makes every shutdown wait 30 s). With no load balancer in front, a short drain is enough.
DRAINING = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
DEFAULT_DRAINING_S = "2"
# The replicas' HTTP ports: range(MIN, MAX) (Ray's default 30000-31000), and how long a released port stays
# out of that range (Ray's default: HAProxy's hard stop + 30 s; there is no HAProxy here).
MIN_PORT, MAX_PORT = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"
QUARANTINE = "RAY_SERVE_PORT_QUARANTINE_S"


def enable_direct_ingress(env: MutableMapping[str, str] = os.environ, port: int | None = None) -> None:
    """Turn direct ingress on for the Ray started after this call (its processes inherit ``env``); with
    ``port``, the one replica's server listens there (and nowhere else)."""
    env[ENABLE] = "1"
    env.setdefault(DRAINING, DEFAULT_DRAINING_S)
    if port is not None:
        env[MIN_PORT], env[MAX_PORT], env[QUARANTINE] = str(port), str(port + 1), "0"


def replica_ports(app_name: str, timeout_s: float = 30.0) -> list[int]:
    """The HTTP ports of the running replicas of ``app_name``'s ingress deployment (the controller's target
    groups; empty after ``timeout_s`` if direct ingress is off or no replica runs)."""
    from ray import serve

    client = serve.context._get_global_client()
    deadline = time.monotonic() + timeout_s
    while True:
        groups = client.get_serve_details().get("target_groups", [])
        ports = sorted(t["port"] for g in groups if g.get("app_name") == app_name and _is_http(g)
                       for t in g["targets"])
        if ports or time.monotonic() > deadline:
            return ports
        time.sleep(0.5)


def direct_urls(app_name: str, host: str, timeout_s: float = 30.0) -> list[str]:
    """The URLs of the replicas' own servers. Built from ``host`` (the ``http_options.host`` they bind),
    not from the targets' node IP: with host 127.0.0.1 the node IP would refuse the connection."""
    shown = f"[{host}]" if ":" in host else host
    return [f"http://{shown}:{port}" for port in replica_ports(app_name, timeout_s)]


def _is_http(group: dict) -> bool:
    return str(group.get("protocol", "")).rsplit(".", 1)[-1].upper() == "HTTP"
