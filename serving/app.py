"""The Ray Serve application: a FastAPI ingress that restores images and makes few-shot adapters.

``build_app(args)`` is the application builder: ``metarestore serve`` calls it, and ``serve run`` /
``serve deploy`` reach it through ``import_path: serving.app:build_app`` in ``serving/config.yaml``.
Two deployments: ``Restorer`` (the model; as many replicas as wanted) and ``AdapterStore`` (one
replica; adapters made on any replica are used on every replica).
"""

# No `from __future__ import annotations`: FastAPI must see real types on the class-based routes.
import asyncio
import contextvars
import functools
import hmac
import math
import os
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from metarestore.degradations import image_families, not_an_image_family
from metarestore.pixels import center_crop
from serving.adapters import AdapterStoreDeployment, default_adapter_dir
from serving.batching import Batcher
from serving.limits import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_BODY_MB,
    DEFAULT_MAX_PIXELS,
    MEDIA_TYPES,
    MULTIPART,
    ApiError,
    decode_image,
    encode_png,
    media_type,
    parse_form,
    read_body,
)
from serving.web import add_page


class AppArgs(BaseModel):
    """Everything the application is built from (``args:`` in the YAML, options of ``metarestore serve``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("builtin:base", description="builtin:base (the shipped model), a checkpoint directory, "
                       "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/...")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI for models:/ and runs:/ URIs.")
    token: SecretStr | None = Field(None, description="Bearer token required on every route but /healthz.")
    token_env: str | None = Field(None, description="Read the token from this environment variable of the "
                                  "replicas instead (for serve deploy; keeps it out of the YAML).")
    num_replicas: int | None = Field(None, ge=1, description="Restorer replicas (default: the deployment's).")
    num_cpus: float = Field(0.5, gt=0, description="CPUs Ray reserves per Restorer replica.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="Where the replica's model "
                        "runs: auto (cuda when the replica sees a GPU: ray_actor_options num_gpus >= 1), cpu or "
                        "cuda. Images are decoded and encoded on the CPU; forward passes and adaptation run here.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per replica (default: its "
                                "num_cpus, rounded, at least 1: more threads than reserved CPUs only contend).")
    niceness: int | None = Field(0, ge=0, le=19, description="Scheduling niceness of the Restorer replicas. "
                                 "Ray starts its workers at 15, below anything else on the machine (a training "
                                 "job at nice 10 takes 3x a replica's share of a shared core); None: Ray's.")
    compute_slots: int = Field(1, ge=1, description="Forward passes and adaptations a replica runs at once, "
                               "each on its own thread and copy of the model (bounds their memory too). 1 on "
                               "CPU: two threads running torch's OpenMP regions slow each other down 2x "
                               "(docs/benchmarks.md); more on a GPU.")
    max_batch_size: int = Field(8, ge=1, description="Restore requests batched together.")
    max_batch_pixels: int | None = Field(131072, ge=1, description="Most pixels of one forward pass: a batch "
                                         "runs in chunks of this size (on CPU small passes stay in the caches: "
                                         "8 x 256x256 at once cost 2.5x more per image than one at a time). "
                                         "None: the whole batch at once (a GPU wants large passes).")
    concurrent_batches: int = Field(1, ge=1, description="Batches a replica runs at once (each borrows one of "
                                    "the compute_slots). 1 with threads = the replica's CPUs is fastest on CPU.")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="Extra wait for a batch to fill when fewer than "
                                        "max_batch_size requests are queued (0: never wait; under load batches "
                                        "form anyway from the requests that queued during the previous pass).")
    png_level: int = Field(0, ge=0, le=9, description="zlib level of the PNG answers: 0 (stored, unfiltered) "
                           "encodes about 10x faster than 1 for about 15% more bytes; raise it for slow networks.")
    tile: int = Field(256, ge=64, description="Images larger than this go through in overlapping tiles: 256 is "
                      "the fastest on CPU (activations stay in cache); larger on a GPU.")
    tile_overlap: int = Field(32, ge=0)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Largest image accepted (pixels).")
    max_body_mb: float = Field(DEFAULT_MAX_BODY_MB, gt=0, description="Largest request body (MiB).")
    max_aspect: float = Field(DEFAULT_MAX_ASPECT, ge=1, description="Most one side of an image may exceed "
                              "the other (a 16,000,000 x 1 strip would hold a replica for minutes).")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a Restorer replica holds at once (more "
                                      "wait at the proxy). Cheap: computation is bounded by compute_slots.")
    max_uploads: int = Field(32, ge=1, description="Request bodies a replica reads at once; more are answered "
                             "503 with Retry-After (bounds body memory: max_uploads x max_body_mb).")
    body_timeout_s: float = Field(5.0, gt=0, description="A request body that sends nothing for this long "
                                  "is answered 408 (stalled clients give their slot back).")
    body_deadline_s: float = Field(120.0, gt=0, description="A request body must be complete within this.")
    max_header_kb: float = Field(16.0, gt=0, description="Largest request headers (KiB), refused with 431 "
                                 "before authentication and before the body is read.")
    max_shots: int = Field(16, ge=1, description="Most (degraded, clean) pairs per adapter.")
    max_steps: int = Field(50, ge=1, description="Most adapt() steps per adapter.")
    adapt_steps: int = Field(10, ge=1, description="adapt() steps when the request does not say.")
    max_adapt_pixels: int = Field(4_000_000, ge=1, description="Most pixels over all support pairs' degraded "
                                  "images of one adapter (accepted and decoded).")
    adapt_memory_mb: float = Field(2048.0, gt=0, description="Memory one adapter fit may use: with the model's "
                                   "activations per pixel it bounds the support pixels fitted on, whatever the request.")
    adapt_side: int = Field(128, ge=32, description="Pairs are centre-cropped to at most this side before an adapter "
                            "is fitted (the fit's cost grows with the pixels; a blur kernel of up to 31 px needs "
                            "about 4x its size).")
    adapt_folds: int = Field(2, ge=1, description="Most leave-one-out folds that choose an adapter's path.")
    adapt_validation_steps: int = Field(3, ge=1, description="Gradient steps of each adapted candidate path in "
                                        "kind=auto's validation (the chosen path is then fitted with the "
                                        "request's steps): a few steps rank candidates at a fraction of the cost.")
    adapt_budget_s: float | None = Field(1.0, gt=0, description="Wall-clock seconds for an adapter's fit, the "
                                         "chosen path's final fit included: adapted (and hqs) candidates that "
                                         "would pass it (with the final fit they predict) are skipped (never "
                                         "chosen, listed in the adapter's skipped). None: no budget.")
    adapt_score_side: int | None = Field(64, ge=8, description="Candidate paths are scored on the central window "
                                         "of this side of each held-out pair (the same pixels for all; 4x fewer "
                                         "pixels to pre-step and restore than 128 px pairs). None: whole pairs.")
    adapt_patch: int = Field(32, ge=8, description="Each gradient step of an adapter fit sees one random window "
                             "of this side per pair (an adapted FiLM/LoRA state acts alike everywhere in an "
                             "image, so windows give nearly the whole pairs' gradient at a fraction of the cost).")
    auto_paths: list[str] | None = Field(None, description="The candidate paths of kind=auto (names as "
                                         "metarestore.operators.paths.Path.parse reads them; default: the core's "
                                         "default_paths()).")
    adapter_ttl_s: float = Field(3600.0, gt=0, description="Adapters expire this long after creation.")
    adapter_max_mb: float = Field(256.0, gt=0, description="Memory for adapters; least recently used go first.")
    adapter_dir: str | None = Field(None, description="Where adapters are persisted: a directory or an fsspec "
                                    "URI (s3://, gs://, a shared volume). Default: METARESTORE_CACHE/adapters "
                                    "(~/.cache/metarestore/adapters) on the store's node.")


class ModelInfo(BaseModel):
    name: str
    version: str
    source: str
    device: str = Field("cpu", description="Where the replica's forward passes and adaptation run.")
    algorithm: str
    adapt: str
    families: dict[str, list[str]]
    inner_steps: int
    parameters: int
    adaptable_parameters: int
    degradations: list[str] = Field(default_factory=list, description="What /v1/restore's ``degradation`` may "
                                    "name (a model trained to be told the degradation); empty: blind only.")
    limits: dict[str, int | float]


class AdapterInfo(BaseModel):
    adapter_id: str
    kind: str = Field("film", description="The kind asked for: auto (the path chosen by held-out validation) or "
                      "a path name.")
    path: str = Field("film", description="The adaptation path used, e.g. film, deconv@0.01+film, hqs@0.01, "
                      "tone (metarestore.operators.paths).")
    shots: int
    steps: int = Field(description="Gradient steps asked for the final fit of an adapted path (film, lora, ...; "
                       "paths without gradient adaptation take none).")
    height: int
    width: int
    fit_height: int | None = Field(None, description="The pairs were centre-cropped to this size for the fit "
                                   "(adapt_side and the memory budget bound it).")
    fit_width: int | None = None
    steps_used: int | None = Field(None, description="Gradient steps of the adapter's final fit (0: its path "
                                   "has no adapted restorer).")
    validation_steps: int | None = Field(None, description="Gradient steps each adapted candidate took in "
                                         "validation (0: the chosen path has none).")
    skipped: list[str] = Field([], description="Adapted candidates not validated within adapt_budget_s (never "
                               "chosen).")
    ruled_out: list[str] = Field([], description="Candidates ruled out before scoring (kernel paths where every "
                                 "fold's fitted kernel is the identity; never chosen).")
    validation: str | None = Field(None, description="How the held-out figures were made: leave-one-out, "
                                   "split-halves (one pair), or none.")
    folds: int | None = Field(None, description="Held-out folds scored.")
    psnr_input: float | None = Field(description="PSNR (dB) of the held-out degraded support images "
                                     "(null: nothing could be held out).")
    psnr_before: float | None = Field(description="PSNR (dB) of the held-out support images restored zero-shot "
                                      "(the model without an adapter).")
    psnr_after: float | None = Field(description="PSNR (dB) of the held-out support images restored with the "
                                     "adapter's path, fitted without them.")
    scores: dict[str, float | None] = Field({}, description="Mean held-out PSNR (dB) of every candidate path.")
    residuals: dict[str, float | None] = Field({}, description="Relative residuals of the operators fitted "
                                               "(kernel, tone, haze).")
    noise: dict[str, float | bool | None] | None = Field(None, description="The noise level fitted on the pairs.")
    fit_ms: float | None = Field(None, description="Time of the fit itself (ms).")
    elapsed_ms: float
    created_at: str
    expires_at: str
    bytes: int
    model_version: str
    label: str | None = Field(None, description="The label given at creation, if any.")


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


app = FastAPI(title="metarestore", version="1",
              description="Restore degraded images; adapt to a new degradation from a few example pairs.")


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    response = error_response(exc.status, exc.code, exc.message)
    response.headers.update(exc.headers)
    return response


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, "internal_error", f"{exc.__class__.__name__} (see the replica's log)")


class _Authenticate:
    """With a token configured, every route but /healthz needs ``Authorization: Bearer <token>``; headers
    larger than the app's ``max_header_bytes`` get 431. A plain ASGI middleware: Starlette's
    ``@app.middleware("http")`` wraps every request and response body in extra tasks and streams."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refused = self._refusal(scope)
            if refused is not None:
                return await refused(scope, receive, send)
        await self.app(scope, receive, send)

    @staticmethod
    def _refusal(scope) -> JSONResponse | None:
        state = scope["app"].state
        max_header = getattr(state, "max_header_bytes", None)
        if max_header is not None and sum(len(k) + len(v) for k, v in scope["headers"]) > max_header:
            return error_response(431, "headers_too_large", f"request headers exceed {max_header // 1024} KiB")
        token: str | None = getattr(state, "token", None)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if token is None or path == "/healthz":
            return None
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return error_response(401, "unauthorized", "missing or wrong bearer token")
        return None


app.add_middleware(_Authenticate)

add_page(app)  # the web page at /: added last, so it answers before authentication (it holds no secret)


@dataclass
class _Job:
    x: torch.Tensor  # (1, 3, H, W): the image, after the adapter's operator pre-step if it has one
    adapter: str | None
    params: dict[str, torch.Tensor] | None  # the adapter's adapted state (None: the model's own parameters)
    kind: str | None = None  # the adapter kind of ``params`` (film, lora, ...)
    family: str | None = None  # the degradation named by the client, for a model that can be told it


class _Timing:
    """Where a request's time went, as a ``Server-Timing`` header (durations in ms, in the order measured)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.parts: list[tuple[str, float]] = []

    def add(self, name: str, seconds: float) -> None:
        self.parts.append((name, seconds))

    def mark(self, name: str, minus: float = 0.0) -> None:
        """``name`` took the time since the previous mark, less ``minus`` seconds (reported separately)."""
        now = time.perf_counter()
        self.add(name, max(0.0, now - self.last - minus))
        self.last = now

    def header(self) -> str:
        parts = self.parts + [("total", time.perf_counter() - self.start)]
        return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in parts)


def _form_file_body(*fields: str) -> dict:
    """OpenAPI request body for routes that parse their multipart form themselves (to bound its size)."""
    props = {f: {"type": "array", "items": {"type": "string", "format": "binary"}} for f in fields}
    return {"requestBody": {"required": True, "content": {MULTIPART: {"schema": {"type": "object",
                                                                                  "properties": props}}}}}


_RESTORE_BODY = _form_file_body("image")
_RESTORE_BODY["requestBody"]["content"].update({t: {"schema": {"type": "string", "format": "binary"}}
                                                for t in ("image/png", "image/jpeg")})
_RESTORE_HEADERS = {
    "X-Degradation": {"schema": {"type": "string"}, "description": "Blind requests only: what the degradation "
                      "estimator found, e.g. 'clean (p=0.97)' or 'jpeg (p=1.00, quality 30) + gaussian_noise "
                      "(p=0.91, severity 0.40)'."},
    "X-Restored-As": {"schema": {"type": "string"}, "description": "Blind requests only: the families undone, in "
                      "order (comma-separated; 'jpeg:0.50' keeps half of the told correction, for mild "
                      "compression), or 'none' when the image came back as it was sent."},
    "X-Model-Version": {"schema": {"type": "string"}}, "X-Adapter": {"schema": {"type": "string"}}}
_ADAPTER_BODY = _form_file_body("degraded", "clean")
_ADAPTER_BODY["requestBody"]["content"][MULTIPART]["schema"]["properties"].update(
    steps={"type": "integer"}, label={"type": "string", "maxLength": 200},
    kind={"type": "string", "default": "auto", "description": "auto (the path is chosen by leave-one-out on the "
          "pairs) or a path: film, zero_shot, deconv@0.01, deconv@0.01+film, hqs@0.01, tone, tone+film, haze, ..."})


# Helpers come before the deployment: Serve serialises the class when it is decorated.
async def _on(executor: Executor, fn, *args):
    """``fn(*args)`` on one of ``executor``'s threads (with the caller's context, as ``asyncio.to_thread``)."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(context.run, fn, *args))


def _db(value: float) -> float:
    """PSNR for JSON: identical images give infinity, reported as 100 dB."""
    return round(min(value, 100.0), 3)


def _label(value) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 200 or not value.isprintable():
        raise ApiError(400, "invalid_label", "label must be printable text of at most 200 characters")
    return value


def _finite(value):
    """JSON has no NaN or infinity: non-finite numbers (a residual that could not be computed) become null."""
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    return value


def _kind(value, auto_names: list[str]) -> str:
    """The ``kind`` form field: auto or a path name that ``Path.parse`` reads back to the same path."""
    from metarestore.operators.paths import MAX_PASSES, PRE_STEPS, Path

    if value is None or value == "":
        return "auto"
    if isinstance(value, str) and value == "auto":
        return value
    try:
        if not isinstance(value, str) or len(value) > 64:
            raise ValueError(value)
        path = Path.parse(value)
        if not math.isfinite(path.balance) or not 0 <= path.balance <= 10 or Path.parse(path.name) != path:
            raise ValueError(value)
        if path.told is not None and f"told:{path.told}" not in auto_names:  # a family the model cannot be told
            raise ValueError(value)
    except ValueError:
        shown = str(value)[:40] if isinstance(value, str) else "(a file)"
        raise ApiError(422, "invalid_kind", f"kind {shown!r} is not auto or an adaptation path; valid: auto, "
                       f"{', '.join(auto_names)} (PRE@BALANCE and PRE@BALANCE+film with PRE one of "
                       f"{', '.join(p for p in PRE_STEPS if p != 'none')}; told:FAMILY or told:FAMILY*N, N up to "
                       f"{MAX_PASSES}, for a family the model can be told)") from None
    return path.name


class _PreStep:
    """An adapter's operator pre-step in the shape of a learner (``restore(x, params, kind=)``), so that
    ``restore_image`` runs it in tiles: its memory stays bounded on large images like the model's."""

    def __init__(self, adapter, learner):
        self.adapter, self.learner = adapter, learner

    def restore(self, x: torch.Tensor, params=None, kind=None) -> torch.Tensor:
        from metarestore.operators.paths import pre_step

        return pre_step(self.adapter.path, self.adapter.operators, x, self.learner)


def read_adapter(data: bytes, learner, adapter_id: str = "adapter"):
    """The core's ``read_adapter`` (this format or an earlier version's FiLM deltas); anything else is a
    409: the stored adapter cannot be used, the client must create it again."""
    from metarestore.operators.adapter import AdapterError
    from metarestore.operators.adapter import read_adapter as read

    try:
        return read(data, learner)
    except AdapterError as exc:
        raise ApiError(409, "adapter_unreadable", f"adapter {adapter_id[:64]} cannot be used ({exc}); create "
                       "it again") from None


def _no_adapter(adapter_id: str) -> ApiError:
    return ApiError(404, "adapter_not_found", f"adapter {adapter_id[:64]!r} does not exist or has expired")


@serve.deployment(name="Restorer", num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(app)
class Restorer:
    """One replica: the model, its forward pass (batched) and adapt()."""

    def __init__(self, cfg: AppArgs, store: DeploymentHandle):
        from metarestore.hub import load_model
        from metarestore.inference import ModelPool, adapt_bytes_per_pixel
        from metarestore.model.network import count_parameters

        self.cfg, self.store = cfg, store
        self.threads = cfg.threads or max(1, round(cfg.num_cpus))
        # torch's CPU work runs on compute_slots threads of the replica's own (``threads`` OpenMP threads each),
        # the rest (this thread, decoding, encoding) on one: once more OpenMP threads exist in all than cores,
        # GNU OpenMP stops spinning between parallel regions and every forward pass slows down about 2x.
        torch.set_num_threads(1)
        self._compute = ThreadPoolExecutor(cfg.compute_slots, thread_name_prefix="restorer-compute",
                                           initializer=torch.set_num_threads, initargs=(self.threads,))
        self._codec = ThreadPoolExecutor(4, thread_name_prefix="restorer-codec", initializer=torch.set_num_threads,
                                         initargs=(1,))
        Image.MAX_IMAGE_PIXELS = cfg.max_pixels  # PIL's own bomb guard agrees with ours
        from metarestore.engine import resolve_device

        self.device = resolve_device(cfg.device)
        self.learner, self.metadata, self.ref = load_model(cfg.model, cfg.tracking_uri, device=self.device)
        self.pool = ModelPool(self.learner, cfg.compute_slots, self.threads)  # self.learner itself never runs
        from metarestore.estimator import load_estimator

        self.estimator = load_estimator(device=self.device)  # blind requests: what happened to the image
        self.version = str(self.ref.version) if self.ref.version else "local"
        self.model_sha256 = self.metadata.get("files", {}).get("model.safetensors", "")
        self.counts = count_parameters(self.learner.model)
        self.replica = serve.get_replica_context().replica_tag
        self.batcher = Batcher(self._run_batch, cfg.max_batch_size, cfg.concurrent_batches,
                               cfg.batch_wait_timeout_s, executor=self._compute)
        app.state.token = self._token()
        app.state.max_header_bytes = int(cfg.max_header_kb * 1024)
        self._uploads = asyncio.Semaphore(cfg.max_uploads)
        self.adapt_pixels = max(256, int(cfg.adapt_memory_mb * 2**20) // adapt_bytes_per_pixel(self.learner))
        self.auto_paths = self._auto_paths(cfg.auto_paths, self.learner)

    @staticmethod
    def _auto_paths(names: list[str] | None, learner) -> list[str]:
        from metarestore.operators.paths import Path, default_paths

        paths = [Path.parse(n) for n in names] if names else default_paths(learner)  # a bad name fails the deploy
        for p in paths:
            learner.hint(p.told)  # a family the model cannot be told fails the deploy too
        if not paths:
            raise ValueError("auto_paths must name at least one path")
        return [p.name for p in paths]

    def _token(self) -> str | None:
        if self.cfg.token is not None:
            return self.cfg.token.get_secret_value()
        if self.cfg.token_env:
            value = os.environ.get(self.cfg.token_env)
            if not value:  # fail closed: never serve open when a token was asked for
                raise RuntimeError(f"token_env {self.cfg.token_env} is not set in the replica's environment")
            return value
        return None

    async def _body(self, request: Request) -> bytes:
        """The body, read under the upload cap and the read timeouts: stalled clients cannot hold slots."""
        if self._uploads.locked():
            raise ApiError(503, "too_many_uploads", f"{self.cfg.max_uploads} uploads are in progress on this "
                           "replica; retry shortly", headers={"Retry-After": "1"})
        async with self._uploads:
            return await read_body(request, int(self.cfg.max_body_mb * 2**20), self.cfg.body_timeout_s,
                                   self.cfg.body_deadline_s)

    def _headers(self, adapter: str | None = None) -> dict[str, str]:
        return {"X-Model-Version": self.version, "X-Adapter": adapter or "none", "X-Replica": self.replica}

    # routes -----------------------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/model", response_model=ModelInfo)
    def model_info(self) -> ModelInfo:
        meta, cfg = self.metadata, self.cfg
        return ModelInfo(
            name=self.ref.name or meta.get("name", "metarestore"), version=self.version, source=self.ref.uri,
            device=str(self.device),
            algorithm=meta["algorithm"], adapt=meta.get("adapt", ""), families=meta.get("families", {}),
            inner_steps=self.learner.inner_steps, parameters=self.counts[0], adaptable_parameters=self.counts[1],
            degradations=image_families(getattr(self.learner.model, "hint_families", ())),
            limits={"max_pixels": cfg.max_pixels, "max_body_mb": cfg.max_body_mb, "max_shots": cfg.max_shots,
                    "max_steps": cfg.max_steps, "adapt_steps": cfg.adapt_steps, "adapter_ttl_s": cfg.adapter_ttl_s,
                    "max_batch_size": cfg.max_batch_size, "tile": cfg.tile,
                    "max_aspect": cfg.max_aspect, "adapt_pixels": self.adapt_pixels, "adapt_side": cfg.adapt_side,
                    "adapt_folds": cfg.adapt_folds, "adapt_patch": cfg.adapt_patch})

    @app.post("/v1/restore", response_class=Response, openapi_extra=_RESTORE_BODY,
              responses={200: {"content": {"image/png": {}}, "description": "The restored image, same size.",
                                "headers": _RESTORE_HEADERS}})
    async def restore(self, request: Request, adapter: str | None = None, degradation: str | None = None) -> Response:
        """Restore one PNG/JPEG (raw body with Content-Type image/png|jpeg, or multipart field ``image``).
        ``degradation`` names what happened to the image (one of ``/v1/model``'s ``degradations``) to a
        model that can be told it. Without it the restore is blind: the degradation estimator reads the image
        (and a JPEG file's quantization tables), the answer's ``X-Degradation`` says what it found and
        ``X-Restored-As`` what was undone; a clean photo, or one it is unsure of, comes back as it was sent.
        Not with ``adapter``.

        The answer's ``Server-Timing`` header says where the replica's time went (ms): reading the body,
        the adapter lookup, decoding, waiting for the model (queue), the forward pass, encoding, total."""
        timing = _Timing()
        self._check_degradation(degradation, adapter)
        body = await self._body(request)
        timing.mark("read")
        kind = media_type(request)
        if kind == MULTIPART:
            form = await parse_form(request, body, max_files=1)
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "missing_field", "the multipart body needs a file field 'image'")
            data = await upload.read()
        elif kind in MEDIA_TYPES:
            data = body
        else:
            raise ApiError(415, "unsupported_media_type", f"Content-Type {kind or '(none)'} is not accepted: send "
                           "image/png or image/jpeg bytes, or multipart/form-data with a file field 'image'")
        if adapter:
            found = await self._adapter(adapter)
            timing.mark("adapter")
        x, grey = await _on(self._codec, decode_image, data, self.cfg.max_pixels, "image", self.cfg.max_aspect)
        timing.mark("decode")
        found_headers, estimate_s = {}, 0.0
        if adapter:
            y, batch, forward_s = await self._restore_adapted(adapter, found, x)
        elif degradation:
            y, batch, forward_s = await self.batcher.submit(_Job(x, None, None, family=degradation))
        else:  # blind: estimate what happened, undo it, or leave the image as it is
            y, batch, forward_s, estimate_s, found_headers = await self._restore_estimated(x, data)
        timing.mark("queue", minus=forward_s + estimate_s)
        if not adapter and not degradation:
            timing.add("estimate", estimate_s)
        timing.add("forward", forward_s)
        png = await _on(self._codec, encode_png, y, grey, self.cfg.png_level)
        timing.mark("encode")
        return Response(png, media_type="image/png", headers={**self._headers(adapter), "X-Batch-Size": str(batch),
                                                              **found_headers, "Server-Timing": timing.header()})

    async def _restore_estimated(self, x: torch.Tensor, data: bytes
                                 ) -> tuple[torch.Tensor, int, float, float, dict[str, str]]:
        """The default path (``inference.restore_estimated``, served): the estimate on a compute thread, then
        one batched pass per family it found (none: the image comes back as it came). Returns (image, batch
        size, forward seconds, estimate seconds, the ``X-Degradation`` and ``X-Restored-As`` headers)."""
        from metarestore.inference import blind_plan

        start = time.perf_counter()
        estimate = await _on(self._compute, self.estimator, x, data)
        estimate_s = time.perf_counter() - start
        batch, forward_s = 0, 0.0
        steps = blind_plan(self.learner, estimate)
        for step in steps:
            y, batch, seconds = await self.batcher.submit(_Job(x, None, None, family=step.family))
            x = step.keep(x, y)
            forward_s += seconds
        return x, batch, forward_s, estimate_s, {"X-Degradation": estimate.summary(),
                                                 "X-Restored-As": ",".join(map(str, steps)) or "none"}

    @app.post("/v1/adapters", response_model=AdapterInfo, openapi_extra=_ADAPTER_BODY)
    async def create_adapter(self, request: Request) -> JSONResponse:
        """Adapt to the degradation shown by K (degraded, clean) pairs; returns the adapter's id and how it
        did on held-out pairs. Form field ``kind``: auto (default: the path is chosen by leave-one-out among
        zero-shot, FiLM and operator + restorer paths) or one path to use."""
        start = time.perf_counter()
        body = await self._body(request)
        if media_type(request) != MULTIPART:
            raise ApiError(415, "unsupported_media_type", "send multipart/form-data with file fields 'degraded' "
                           "and 'clean' (once per pair, in order) and an optional field 'steps'")
        form = await parse_form(request, body, max_files=4 * self.cfg.max_shots)
        degraded, clean = form.getlist("degraded"), form.getlist("clean")
        if not all(isinstance(f, UploadFile) for f in degraded + clean):
            raise ApiError(400, "missing_field", "'degraded' and 'clean' must be files")
        if not degraded or not clean:
            raise ApiError(400, "missing_field", "send at least one pair: file fields 'degraded' and 'clean'")
        if len(degraded) != len(clean):
            raise ApiError(400, "pair_count_mismatch", f"{len(degraded)} degraded but {len(clean)} clean images")
        if len(degraded) > self.cfg.max_shots:
            raise ApiError(400, "too_many_shots", f"{len(degraded)} pairs; at most {self.cfg.max_shots}")
        steps = self._steps(form.get("steps"))
        label = _label(form.get("label"))
        kind = _kind(form.get("kind"), self.auto_paths)
        pairs = [(await d.read(), await c.read()) for d, c in zip(degraded, clean, strict=True)]
        support_x, support_y = await _on(self._codec, self._decode_pairs, pairs)
        from metarestore.operators.adapter import AdapterError

        try:
            found, data = await _on(self._compute, self._adapt, support_x, support_y, steps, kind)
        except AdapterError as exc:  # e.g. kind=jpeg on pairs no JPEG setting explains
            raise ApiError(422, "adapter_fit_failed", f"the pairs cannot be fitted with kind {kind} ({exc})") from None
        found["elapsed_ms"] = round((time.perf_counter() - start) * 1000, 1)
        found["label"] = label
        try:
            info = await self.store.put.remote(data, found)
        except ValueError as exc:
            raise ApiError(413, "adapter_too_large", str(exc)) from None
        return JSONResponse(AdapterInfo(**info).model_dump(), headers=self._headers(info["adapter_id"]))

    @app.get("/v1/adapters", response_model=AdapterList)
    async def list_adapters(self) -> AdapterList:
        """Every adapter that has not expired, oldest first."""
        return AdapterList(adapters=[AdapterInfo(**i) for i in await self.store.infos.remote()])

    @app.get("/v1/adapters/{adapter_id}", response_model=AdapterInfo)
    async def get_adapter(self, adapter_id: str) -> AdapterInfo:
        info = await self.store.info.remote(adapter_id)
        if info is None:
            raise _no_adapter(adapter_id)
        return AdapterInfo(**info)

    @app.delete("/v1/adapters/{adapter_id}")
    async def delete_adapter(self, adapter_id: str) -> dict:
        if not await self.store.delete.remote(adapter_id):
            raise _no_adapter(adapter_id)
        return {"adapter_id": adapter_id, "deleted": True}

    # work -------------------------------------------------------------------------------------------
    async def _adapter(self, adapter_id: str):
        """The stored adapter, parsed against this replica's model (an ``Adapter``)."""
        found = await self.store.get.remote(adapter_id)
        if found is None:
            raise _no_adapter(adapter_id)
        info, data = found
        if info.get("model_sha256") != self.model_sha256:
            raise ApiError(409, "adapter_model_mismatch", f"adapter {adapter_id} was made for another model; "
                           "create it again")
        return await _on(self._codec, read_adapter, data, self.learner, adapter_id)

    async def _restore_adapted(self, adapter_id: str, adapter, x: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        """``Adapter.restore`` in two parts: the operator pre-step (if the path has one) on this request
        alone, in tiles, then the restorer (the model with the adapter's FiLM/LoRA state, or as it is) in the
        batched forward pass with the other requests of the same size and adapter. Adapters without a
        pre-step go straight to the batch; classical paths (wiener, rl: no restorer) are answered unbatched.
        Returns (image, batch size, compute seconds: the pre-step's and the forward pass's)."""
        pre_s = 0.0
        if adapter.path.pre != "none":
            start = time.perf_counter()
            x = await _on(self._compute, self._pre_step, adapter, x)
            pre_s = time.perf_counter() - start
        if adapter.path.restorer == "none":
            return x.clamp(0, 1), 1, pre_s
        if not adapter.path.adapted:  # told:F*N: N batched passes
            forward_s = 0.0
            for _ in range(adapter.path.passes):
                x, batch, seconds = await self.batcher.submit(_Job(x, adapter_id, None, family=adapter.path.told))
                forward_s += seconds
            y = x
        else:
            y, batch, forward_s = await self.batcher.submit(_Job(x, adapter_id, adapter.params, adapter.path.restorer,
                                                                 family=adapter.path.told))
        return y, batch, pre_s + forward_s

    def _check_degradation(self, degradation: str | None, adapter: str | None) -> None:
        if degradation is None:
            return
        known = getattr(self.learner.model, "hint_families", ())
        if not known:
            raise ApiError(400, "degradation_not_accepted", "this model restores blind: it cannot be told the "
                           "degradation (leave out 'degradation')")
        if degradation not in known:
            raise ApiError(400, "unknown_degradation", f"degradation {degradation[:40]!r} is not one this model "
                           f"can be told: {', '.join(image_families(known))}")
        if reason := not_an_image_family(degradation):
            raise ApiError(400, "degradation_not_for_images", reason)
        if adapter:
            raise ApiError(400, "degradation_with_adapter", "give 'adapter' or 'degradation', not both: an "
                           "adapter already says what the degradation is")

    def _pre_step(self, adapter, x: torch.Tensor) -> torch.Tensor:
        from metarestore.inference import restore_image

        with self.pool.borrow() as learner:  # hqs restores with the model: this thread's own copy
            return restore_image(_PreStep(adapter, learner), x, tile=self.cfg.tile, overlap=self.cfg.tile_overlap)

    def _steps(self, value) -> int:
        if value is None or value == "":
            return self.cfg.adapt_steps
        try:
            steps = int(value)
        except (TypeError, ValueError):
            raise ApiError(400, "invalid_steps", f"steps must be an integer, got {str(value)[:20]!r}") from None
        if steps < 1:
            raise ApiError(400, "invalid_steps", "steps must be at least 1")
        if steps > self.cfg.max_steps:
            raise ApiError(400, "too_many_steps", f"steps={steps}; at most {self.cfg.max_steps}")
        return steps

    def _decode_pairs(self, pairs: list[tuple[bytes, bytes]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode and check the pairs; pairs of different sizes are centre-cropped to the smallest."""
        xs, ys, total = [], [], 0
        for i, (d, c) in enumerate(pairs, 1):
            x, _ = decode_image(d, self.cfg.max_pixels, f"degraded image {i}", self.cfg.max_aspect)
            total += x.shape[-1] * x.shape[-2]
            if total > self.cfg.max_adapt_pixels:  # checked as we go: memory stays bounded
                raise ApiError(413, "too_many_pixels", f"the support images hold more than "
                               f"{self.cfg.max_adapt_pixels / 1e6:g} MP (send fewer or smaller pairs)")
            y, _ = decode_image(c, self.cfg.max_pixels, f"clean image {i}", self.cfg.max_aspect)
            if x.shape != y.shape:
                raise ApiError(400, "pair_size_mismatch", f"pair {i}: degraded is {x.shape[-1]}x{x.shape[-2]}, "
                               f"clean is {y.shape[-1]}x{y.shape[-2]}; each pair must be the same size")
            xs.append(x)
            ys.append(y)
        h, w = min(x.shape[-2] for x in xs), min(x.shape[-1] for x in xs)
        return torch.cat([center_crop(x, h, w) for x in xs]), torch.cat([center_crop(y, h, w) for y in ys])

    def _adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int,
               kind: str) -> tuple[dict, bytes]:
        """``fit_bounded`` on this thread's own model copy: pairs centre-cropped to ``adapt_side`` and the
        memory budget, at most ``adapt_folds`` leave-one-out folds, ``steps`` gradient steps per adapted
        path, each on ``adapt_patch``-px windows."""
        from metarestore.inference import fit_bounded

        cfg = self.cfg
        start = time.perf_counter()
        with self.pool.borrow() as learner:  # this thread's own copy: nothing shared with other requests
            adapter = fit_bounded(learner, support_x, support_y, kind=kind, paths=self.auto_paths,
                                  max_side=cfg.adapt_side, max_pixels=self.adapt_pixels, steps=steps,
                                  patch=cfg.adapt_patch, max_folds=cfg.adapt_folds,
                                  validation_steps=cfg.adapt_validation_steps, budget_s=cfg.adapt_budget_s,
                                  score_side=cfg.adapt_score_side)
            data = adapter.to_bytes()
        fit = adapter.info
        info = {"kind": kind, "path": adapter.path.name, "shots": len(support_x), "steps": steps,
                "steps_used": fit.get("steps", 0), "validation_steps": fit.get("validation_steps"),
                "skipped": fit.get("skipped", []), "ruled_out": fit.get("ruled_out", []),
                "height": support_x.shape[-2], "width": support_x.shape[-1],
                "fit_height": fit["fit_height"], "fit_width": fit["fit_width"], "validation": fit.get("validation"),
                "folds": fit.get("folds"), "psnr_input": fit.get("psnr_before"),
                "psnr_before": fit.get("psnr_zero_shot"), "psnr_after": fit.get("psnr_after"),
                "scores": {n: None if v is None else _db(v) for n, v in fit.get("scores", {}).items()}, "residuals": fit.get("residuals", {}), "noise": fit.get("noise"),
                "fit_ms": round((time.perf_counter() - start) * 1000, 1),
                "model_version": self.version, "model_sha256": self.model_sha256}
        return {k: (_db(v) if k.startswith("psnr") and v is not None else _finite(v)) for k, v in info.items()}, data

    def _run_batch(self, jobs: list[_Job]) -> list[tuple[torch.Tensor, int, float]]:
        """Requests that queued together; same-size ones (and the same adapter) share a forward pass.
        Each gets (its image, the size of its pass, the seconds of its pass)."""
        from metarestore.inference import restore_image

        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            h, w = job.x.shape[-2:]
            alone = i if max(h, w) > self.cfg.tile else -1  # tiled images go one by one: bounded memory
            groups.setdefault((h, w, job.adapter, job.family, alone), []).append(i)
        results: list[tuple[torch.Tensor, int, float]] = [None] * len(jobs)  # type: ignore[list-item]
        for members in groups.values():
            first = jobs[members[0]]
            batch = torch.cat([jobs[i].x for i in members]).to(self.device)  # tiles blend on the model's device
            with self.pool.borrow() as learner:  # this thread's own copy: nothing shared with other requests
                start = time.perf_counter()
                out = restore_image(learner, batch, first.params, tile=self.cfg.tile, overlap=self.cfg.tile_overlap,
                                    kind=first.kind, max_batch_pixels=self.cfg.max_batch_pixels,
                                    family=first.family).cpu()
                seconds = time.perf_counter() - start
            for j, i in enumerate(members):
                results[i] = (out[j:j + 1], len(members), seconds)
        return results


def logging_config(access_log: bool = False) -> dict:
    """Serve's ``logging_config`` for ``serve.start`` (the proxy) and ``serve.run`` (the replicas). Without
    access logs a request writes no line (Serve's default is one INFO line per request and per call between
    deployments, in the console and in Ray's log directory); warnings and errors are still shown and kept."""
    return {"enable_access_log": access_log}


# The Restorer replica's process environment (measured in docs/benchmarks.md, "Serving at the speed of the model"):
REPLICA_ENV = {
    # one OpenMP thread by default in every thread of the replica: only its compute threads run more
    "OMP_NUM_THREADS": "1",
    # after a forward pass GNU OpenMP's idle threads spin 300,000 rounds (libgomp's default), holding a core
    # that the PNG codecs and the HTTP server of the same request need; 10,000 still spans the gaps between
    # the operators of one pass (256x256 overhead +10.8 to +12.8 ms -> +8.3 to +9.1 ms)
    "GOMP_SPINCOUNT": "10000",
    # user code on the replica's own event loop: no thread hop per ASGI message (about -1 ms a request); the
    # replica's code never blocks its loop (torch and codecs run on executors)
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}


def build_app(args: dict) -> serve.Application:
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
