"""CLI commands of the `serving` package, added to `metarestore` by `register(app)`.

Only typer at import time: heavy imports belong inside the command functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from metarestore.errors import UserError

APP_NAME = "metarestore"


class _ListOptionsCommand(TyperCommand):
    """Lets ``--degraded a.png b.png`` mean ``--degraded a.png --degraded b.png`` (like argparse's nargs='+')."""

    list_options = ("--degraded", "--clean")

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        expanded: list[str] = []
        current, has_value = None, True  # the list option being read; whether it has had its first value
        for i, arg in enumerate(args):
            if arg == "--":
                expanded += args[i:]
                break
            if arg.startswith("-") and arg != "-":
                name = arg.split("=", 1)[0]
                current = name if name in self.list_options else None
                has_value = "=" in arg
                expanded.append(arg)
            elif current is not None and has_value:
                expanded += [current, arg]  # one more value for the same option
            else:
                expanded.append(arg)
                has_value = True
        return super().parse_args(ctx, expanded)


def _free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _failure(serve, exc: Exception) -> str:
    """The last line of the failing deployment's message (the replica's exception), else of ``exc``."""
    try:
        deployments = serve.status().applications[APP_NAME].deployments.values()
        text = "\n".join(d.message for d in deployments if d.message)
    except Exception:  # the status is only a nicer message; never hide the failure itself
        text = ""
    lines = [line.strip() for line in (text or str(exc)).splitlines() if line.strip()]
    return lines[-1][:300] if lines else exc.__class__.__name__


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


# The options of ``metarestore serve``, one alias each: the command's signature stays readable.
ModelOption = Annotated[str | None, typer.Option("--model", help="builtin:base (the default), a checkpoint "
                                                 "directory, models:/NAME@ALIAS, models:/NAME/VERSION or "
                                                 "runs:/RUN_ID/PATH.")]
HostOption = Annotated[str, typer.Option(help="Interface to listen on: 127.0.0.1 is this machine only; "
                                         "0.0.0.0 exposes the server to the network.")]
PortOption = Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")]
ReplicasOption = Annotated[int | None, typer.Option(min=1, help="Model replicas (Ray Serve deployment replicas; "
                                                    "default 1).")]
BatchOption = Annotated[int | None, typer.Option(min=1, help="Restore requests of the same size served by one "
                                                 "forward pass (dynamic batching; 1 disables it; default 8).")]
TokenEnvOption = Annotated[str | None, typer.Option(help="Require 'Authorization: Bearer <token>' on every route "
                                                    "but /healthz; the token is read from this environment "
                                                    "variable.")]
CpusOption = Annotated[float | None, typer.Option(min=0.01, help="CPUs Ray reserves per replica; also its torch "
                                                  "threads (rounded, at least 1). Default: one local replica "
                                                  "takes every CPU of the local Ray (a lone request runs on all "
                                                  "cores, concurrent ones share batched passes); with --replicas "
                                                  "N or --address, 0.5 CPU and 1 thread each.")]
PixelsOption = Annotated[int | None, typer.Option(min=1, help="Largest image accepted, in pixels (default "
                                                  "16,000,000).")]
BodyOption = Annotated[float | None, typer.Option(min=0.01, help="Largest request body, in MiB (default 64).")]
TtlOption = Annotated[float | None, typer.Option(min=1, help="Seconds an adapter lives after creation (default "
                                                 "3600).")]
AdapterDirOption = Annotated[str | None, typer.Option(help="Where adapters are kept across restarts: a directory "
                                                      "or an fsspec URI such as s3://bucket/adapters (default "
                                                      "~/.cache/metarestore/adapters).")]
AddressOption = Annotated[str | None, typer.Option(help="Ray cluster to deploy on (auto, HOST:6379); default: "
                                                   "start a local Ray in this process.")]
TrackingOption = Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (default: "
                                                    "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")]
AccessLogOption = Annotated[bool, typer.Option("--access-log", help="Log one line per request (Ray Serve's "
                                               "access log, in the console and Ray's log directory); off by "
                                               "default: warnings and errors are shown either way.")]
DirectOption = Annotated[bool | None, typer.Option("--direct-ingress/--proxy", help="Direct ingress (the "
                                                   "default for one replica on a local Ray): clients reach the "
                                                   "replica's own HTTP server at --port, skipping the hop "
                                                   "through Serve's proxy (~10-30 ms a request); the proxy "
                                                   "listens on another port, printed at start. What it gives "
                                                   "up: several replicas behind one port (each replica has its "
                                                   "own; --replicas N and --address use the proxy), and a "
                                                   "replica replaced while the old one still holds the port "
                                                   "answers only through the proxy. --proxy: every request "
                                                   "through Serve's proxy at --port, as on a cluster.")]


def serve_command(model: ModelOption = None, host: HostOption = "127.0.0.1", port: PortOption = 8000,
                  replicas: ReplicasOption = None, max_batch_size: BatchOption = None,
                  token_env: TokenEnvOption = None, cpus_per_replica: CpusOption = None,
                  max_pixels: PixelsOption = None, max_body_mb: BodyOption = None, adapter_ttl: TtlOption = None,
                  adapter_dir: AdapterDirOption = None, address: AddressOption = None,
                  tracking_uri: TrackingOption = None, access_log: AccessLogOption = False,
                  direct_ingress: DirectOption = None) -> None:
    """Serve the restorer over HTTP with Ray Serve until Ctrl-C (API docs at /docs)."""
    given = {"num_replicas": replicas, "num_cpus": cpus_per_replica, "max_batch_size": max_batch_size,
             "max_pixels": max_pixels, "max_body_mb": max_body_mb, "adapter_ttl_s": adapter_ttl,
             "adapter_dir": adapter_dir}
    args, ref = _app_args(model, tracking_uri, token_env, host, port, given)
    direct = _direct_ingress(direct_ingress, address, args.num_replicas or 1)
    _check_placement(args, address)
    whole = cpus_per_replica is None and not address and (args.num_replicas or 1) == 1
    _run(args, ref, host, port, address, token_env, access_log, direct, whole)


def _app_args(model: str | None, tracking_uri: str | None, token_env: str | None, host: str, port: int,
              given: dict):
    """The application's settings from the options the user set (every default lives in AppArgs), and the
    model's reference. A wrong URI or a corrupt checkpoint fails here, in seconds and before Ray starts
    (this also fills the download cache that the replicas on this machine then read)."""
    from pydantic import ValidationError

    from metarestore.hub import DEFAULT_MODEL, load_model, portable_uri
    from metarestore.tracking import resolve_uri

    token = None
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise UserError(f"--token-env {token_env}: that environment variable is not set or empty")
    tracking = resolve_uri(tracking_uri)
    model = portable_uri(model or DEFAULT_MODEL)
    _, _, ref = load_model(model, tracking)
    _free(host, port)

    from serving.app import AppArgs

    adapter_dir = given.get("adapter_dir")
    if adapter_dir is not None and "://" not in adapter_dir:
        given["adapter_dir"] = str(Path(adapter_dir).expanduser().resolve())  # replicas run in another directory
    try:
        args = AppArgs(model=model, tracking_uri=tracking, token=token,
                       **{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise UserError(str(exc).splitlines()[-1]) from None
    return args, ref


def _direct_ingress(asked: bool | None, address: str | None, replicas: int) -> bool:
    """Whether clients reach the replica directly: as asked, else where it applies (one replica, local Ray)."""
    if asked is None:
        return not address and replicas == 1
    if asked and address:
        raise UserError("--direct-ingress needs the local Ray this command starts (a cluster must be started "
                        "with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 instead)")
    if asked and replicas > 1:
        raise UserError("--direct-ingress serves one replica (each replica gets its own port: several need a "
                        "load balancer in front); drop --replicas or direct ingress")
    return asked


def _check_placement(args, address: str | None) -> None:
    replicas = args.num_replicas or 1
    if not address and replicas * args.num_cpus > (os.cpu_count() or 1):
        raise UserError(f"{replicas} replica(s) x {args.num_cpus:g} CPU need more than this machine's "
                        f"{os.cpu_count()} CPUs: lower --replicas or --cpus-per-replica")


def _run(args, ref, host: str, port: int, address: str | None, token_env: str | None, access_log: bool,
         direct_ingress: bool, whole_machine: bool) -> None:
    """Start Ray (or join ``address``) and Serve, deploy, say where, and serve until Ctrl-C or SIGTERM.
    ``whole_machine``: the one replica takes every CPU of the local Ray (``settings.whole_machine``)."""
    import signal
    import time

    import ray
    from ray import serve

    from cluster.ray_runtime import free_port, init_ray
    from serving.app import build_app, logging_config
    from serving.ingress import enable_direct_ingress
    from serving.settings import whole_machine as take_machine

    proxy_port = port
    if direct_ingress:  # the replica answers at --port, the proxy on a port of its own
        enable_direct_ingress(port=port)  # before Ray starts: its processes read it when they start
        proxy_port = free_port()
    # Like train/tune/evaluate: --address joins a cluster (a submitted job passes `auto`), otherwise a new
    # local Ray; $RAY_ADDRESS alone never redirects a command to someone else's cluster.
    init_ray(address, include_dashboard=False)
    if whole_machine:  # Ray's own count of the CPUs (a container's quota, not the host's cores)
        args = take_machine(args, ray.cluster_resources().get("CPU", 1))
    # After ray.init (which installs its own SIGTERM handler): `kill PID` stops as cleanly as Ctrl-C, and
    # Ctrl-C works even where the shell started us with SIGINT ignored (a background job).
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        logs = logging_config(access_log)
        serve.start(http_options={"host": host, "port": proxy_port}, logging_config=logs)
        try:
            serve.run(build_app(args), name=APP_NAME, route_prefix="/", logging_config=logs)
        except RuntimeError as exc:  # a replica could not start: its exception is the end of Serve's message
            raise UserError(f"the application did not start: {_failure(serve, exc)}") from None
        _announce(args, ref, host, port, token_env, proxy_port if direct_ingress else None)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("shutting down", err=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the clean-up
        if address:
            serve.delete(APP_NAME)  # a shared cluster keeps Serve for its other applications
        else:
            serve.shutdown()
        ray.shutdown()
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _announce(args, ref, host: str, port: int, token_env: str | None, proxy_port: int | None) -> None:
    """Where to send requests: --port (the replica's own server under direct ingress, else the proxy)."""
    from serving.ingress import direct_urls

    what = f"{ref.name} version {ref.version}" if ref.version else str(ref.path)
    auth = f", bearer token from ${token_env}" if token_env else ""
    url, via = f"http://{host}:{port}", ""
    if proxy_port is not None:
        urls = direct_urls(APP_NAME, host)
        if not urls:
            raise UserError("direct ingress: the replica's HTTP port did not appear in Serve's target groups")
        url, via = urls[0], f"; direct ingress, through Serve's proxy: http://{host}:{proxy_port}"
    threads = args.torch_threads()
    typer.echo(f"serving {what} at {url} ({args.num_replicas or 1} replica(s) x {args.num_cpus:g} CPU, "
               f"{threads} torch thread(s){auth}{via}); API docs at {url}/docs. Ctrl-C to stop.", err=True)


def adapt_command(
    degraded: Annotated[list[Path], typer.Option("--degraded", help="Degraded example images, one or more "
                                                 "(1 to 16; PNG or JPEG), in the same order as --clean.")],
    clean: Annotated[list[Path], typer.Option("--clean", help="The clean originals of the --degraded images, "
                                              "in the same order; each the same size as its pair.")],
    endpoint: Annotated[str, typer.Option(help="Server URL, e.g. http://127.0.0.1:8000.")],
    steps: Annotated[int | None, typer.Option(min=1, max=50, help="adapt() gradient steps (default: the "
                                              "server's, 10).")] = None,
    path: Annotated[str | None, typer.Option("--path", "--kind", help="auto (the server picks the path by "
                                             "leave-one-out on the pairs; the default) or a path: film, "
                                             "deconv@0.01+film, hqs@0.01, tone, ... (--kind: its former name, "
                                             "deprecated)")] = None,
    token: Annotated[str | None, typer.Option(envvar="METARESTORE_TOKEN", help="Bearer token, if the server "
                                              "requires one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the adapter's JSON instead of its id.")] = False,
) -> None:
    """Create an adapter on a server from (degraded, clean) example pairs; prints its id.

    Use it with: metarestore restore IN -o OUT --endpoint URL --adapter ID
    """
    import json

    from serving.client import RestorerClient

    info = RestorerClient(endpoint, token=token).create_adapter(degraded, clean, steps=steps, path=path)
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    typer.echo(info["adapter_id"])

    def db(key: str) -> str:
        return "?" if info.get(key) is None else f"{info[key]:.2f}"

    typer.echo(f"{info['shots']} pair(s), path {info.get('path', 'film')}, {info['elapsed_ms']:.0f} ms: PSNR on "
               f"held-out pairs {db('psnr_zero_shot')} dB without the adapter, {db('psnr_adapted')} dB with it "
               f"(degraded: {db('psnr_input')} dB); expires {info['expires_at']}", err=True)


def register(app: typer.Typer) -> None:
    """Add this package's commands to the metarestore CLI."""
    app.command("serve")(serve_command)
    app.command("adapt", cls=_ListOptionsCommand)(adapt_command)
