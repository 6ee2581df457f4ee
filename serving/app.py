"""The Ray Serve application: the HTTP routes over the restorer core, the deployment and its builder.

``build_app(args)`` is the application builder: ``metarestore serve`` calls it, and ``serve run`` /
``serve deploy`` reach it through ``import_path: serving.app:build_app`` in ``serving/config.yaml``.
Two deployments: ``Restorer`` (the model; as many replicas as wanted) and ``AdapterStore`` (one
replica; adapters made on any replica are used on every replica).

Each Restorer replica builds its own FastAPI app (``http_app``, from Serve's ``__serve_build_asgi_app__``
hook) around its own ``Replica``: nothing is written to module-level state, and the same app runs
without Serve. Where the rest lives: settings ``serving/settings.py``, JSON answers ``serving/schemas.py``,
the computation ``serving/core.py``, request checks ``serving/forms.py`` and ``serving/limits.py``, errors,
authentication, timing and OpenAPI additions ``serving/errors.py``, ``auth.py``, ``timing.py``, ``openapi.py``.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations as real types.
import time
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from metarestore.degradations import image_families
from serving.adapters import AdapterStoreDeployment, default_adapter_dir
from serving.auth import Authenticate
from serving.core import RestorerCore, read_adapter
from serving.errors import add_error_handlers, no_adapter
from serving.forms import adapter_form, restore_image_bytes
from serving.limits import ApiError
from serving.openapi import RESTORE_HEADERS, adapter_body, restore_body
from serving.replica import REPLICA_ENV, Replica, tune_process
from serving.schemas import AdapterInfo, AdapterList, ModelInfo, fit_report
from serving.settings import AppArgs
from serving.timing import ServerTiming
from serving.web import add_page

__all__ = ["REPLICA_ENV", "AppArgs", "Restorer", "build_app", "http_app", "logging_config", "read_adapter"]

router = APIRouter()


def _replica(request: Request) -> Replica:
    return request.app.state.replica


ThisReplica = Annotated[Replica, Depends(_replica)]


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/v1/model", response_model=ModelInfo)
def model_info(r: ThisReplica) -> ModelInfo:
    core, cfg = r.core, r.cfg
    meta, (parameters, adaptable) = core.metadata, core.counts
    return ModelInfo(
        name=core.ref.name or meta.get("name", "metarestore"), version=core.version, source=core.ref.uri,
        device=str(core.device), algorithm=meta["algorithm"], adapt=meta.get("adapt", ""),
        families=meta.get("families", {}), inner_steps=core.learner.inner_steps, parameters=parameters,
        adaptable_parameters=adaptable, degradations=image_families(core.learner.hint_families),
        limits={"max_pixels": cfg.max_pixels, "max_body_mb": cfg.max_body_mb, "max_shots": cfg.max_shots,
                "max_steps": cfg.max_steps, "adapt_steps": cfg.adapt_steps, "adapter_ttl_s": cfg.adapter_ttl_s,
                "max_batch_size": cfg.max_batch_size, "tile": cfg.tile, "max_aspect": cfg.max_aspect,
                "adapt_pixels": core.adapt_pixels, "adapt_side": cfg.adapt_side, "adapt_folds": cfg.adapt_folds,
                "adapt_patch": cfg.adapt_patch})


@router.post("/v1/restore", response_class=Response, openapi_extra=restore_body(),
             responses={200: {"content": {"image/png": {}}, "description": "The restored image, same size.",
                              "headers": RESTORE_HEADERS}})
async def restore(r: ThisReplica, request: Request, adapter: str | None = None,
                  degradation: str | None = None) -> Response:
    """Restore one PNG/JPEG (raw body with Content-Type image/png|jpeg, or multipart field ``image``).
    ``degradation`` names what happened to the image (one of ``/v1/model``'s ``degradations``) to a
    model that can be told it. Without it the restore is blind: the degradation estimator reads the image
    (and a JPEG file's quantization tables), the answer's ``X-Degradation`` says what it found and
    ``X-Restored-As`` what was undone; a clean photo, or one it is unsure of, comes back as it was sent.
    Not with ``adapter``.

    The answer's ``Server-Timing`` header says where the replica's time went (ms): reading the body,
    the adapter lookup, decoding, waiting for the model (queue), the forward pass, encoding, total."""
    timing, core = ServerTiming(), r.core
    core.check_degradation(degradation, adapter)
    data = await restore_image_bytes(request, await r.body(request))
    timing.mark("read")
    if adapter:
        found = await r.adapter(adapter)
        timing.mark("adapter")
    x, grey = await core.decode(data)
    timing.mark("decode")
    if adapter:
        done = await core.restore_adapted(adapter, found, x)
    elif degradation:
        done = await core.restore_told(x, degradation)
    else:  # blind: estimate what happened, undo it, or leave the image as it is
        done = await core.restore_blind(x, data)
    timing.mark("queue", minus=done.forward_s + done.estimate_s)
    if done.found is not None:
        timing.add("estimate", done.estimate_s)
    timing.add("forward", done.forward_s)
    png = await core.encode(done.image, grey)
    timing.mark("encode")
    found_headers = {} if done.found is None else {"X-Degradation": done.found,
                                                   "X-Restored-As": ",".join(done.undone) or "none"}
    return Response(png, media_type="image/png", headers={**r.headers(adapter), "X-Batch-Size": str(done.batch),
                                                          **found_headers, "Server-Timing": timing.header()})


@router.post("/v1/adapters", response_model=AdapterInfo, openapi_extra=adapter_body())
async def create_adapter(r: ThisReplica, request: Request) -> JSONResponse:
    """Adapt to the degradation shown by K (degraded, clean) pairs; returns the adapter's id and how it
    did on held-out pairs. Form field ``path`` (``kind``: its deprecated alias): auto (default: the path is
    chosen by leave-one-out among zero-shot, FiLM and operator + restorer paths) or one path to use."""
    start, core, cfg = time.perf_counter(), r.core, r.cfg
    form = await adapter_form(request, await r.body(request), cfg.max_shots, cfg.adapt_steps, cfg.max_steps,
                              core.auto_paths)
    support_x, support_y = await core.decode_pairs(form.pairs)
    fitted = await core.fit(support_x, support_y, form.steps, form.path)
    found = fit_report(fitted, core.version, core.model_sha256)
    found["elapsed_ms"] = round((time.perf_counter() - start) * 1000, 1)
    found["label"] = form.label
    try:
        info = await r.store.put.remote(fitted.data, found)
    except ValueError as exc:
        raise ApiError(413, "adapter_too_large", str(exc)) from None
    return JSONResponse(AdapterInfo(**info).model_dump(), headers=r.headers(info["adapter_id"]))


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(r: ThisReplica) -> AdapterList:
    """Every adapter that has not expired, oldest first."""
    return AdapterList(adapters=[AdapterInfo(**i) for i in await r.store.infos.remote()])


@router.get("/v1/adapters/{adapter_id}", response_model=AdapterInfo)
async def get_adapter(r: ThisReplica, adapter_id: str) -> AdapterInfo:
    info = await r.store.info.remote(adapter_id)
    if info is None:
        raise no_adapter(adapter_id)
    return AdapterInfo(**info)


@router.delete("/v1/adapters/{adapter_id}")
async def delete_adapter(r: ThisReplica, adapter_id: str) -> dict:
    if not await r.store.delete.remote(adapter_id):
        raise no_adapter(adapter_id)
    return {"adapter_id": adapter_id, "deleted": True}


def http_app(replica: Replica | None, token: str | None = None, max_header_bytes: int | None = None) -> FastAPI:
    """The FastAPI app of one replica: the routes over ``replica`` (None: an app whose routes cannot answer,
    for checking what comes before them: the page, authentication, errors), the error shape, then the
    authentication and, outermost, the web page (it holds no secret: it answers before authentication)."""
    app = FastAPI(title="metarestore", version="1",
                  description="Restore degraded images; adapt to a new degradation from a few example pairs.")
    app.state.replica = replica
    app.include_router(router)
    add_error_handlers(app)
    app.add_middleware(Authenticate, token=token, max_header_bytes=max_header_bytes)
    add_page(app)
    return app


@serve.deployment(name="Restorer", num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Restorer:
    """One replica: its core (the model, its batched forward pass, adapt()) and its own HTTP app."""

    def __init__(self, cfg: AppArgs, store):
        tune_process(cfg)
        self.token = cfg.bearer_token()  # before the model loads: a missing token_env fails the replica fast
        self.replica = Replica(RestorerCore(cfg), store, serve.get_replica_context().replica_tag)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return http_app(self.replica, self.token, int(self.replica.cfg.max_header_kb * 1024))


def logging_config(access_log: bool = False) -> dict:
    """Serve's ``logging_config`` for ``serve.start`` (the proxy) and ``serve.run`` (the replicas). Without
    access logs a request writes no line (Serve's default is one INFO line per request and per call between
    deployments, in the console and in Ray's log directory); warnings and errors are still shown and kept."""
    return {"enable_access_log": access_log}


def build_app(args: dict | AppArgs) -> serve.Application:
    """The application builder (``import_path: serving.app:build_app``); ``args`` are AppArgs fields."""
    cfg = args if isinstance(args, AppArgs) else AppArgs(**args)
    store = AdapterStoreDeployment.bind(cfg.adapter_ttl_s, int(cfg.adapter_max_mb * 2**20),
                                        cfg.adapter_dir or default_adapter_dir())
    env = dict(REPLICA_ENV)
    if cfg.niceness is not None:  # read by the worker Ray starts for the replica
        env["RAY_worker_niceness"] = str(cfg.niceness)
    actor: dict = {"num_cpus": cfg.num_cpus, "runtime_env": {"env_vars": env}}
    options: dict = {"ray_actor_options": actor, "max_ongoing_requests": cfg.max_ongoing_requests}
    if cfg.num_replicas is not None:
        options["num_replicas"] = cfg.num_replicas
    return Restorer.options(**options).bind(cfg, store)
