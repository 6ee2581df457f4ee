"""The application's settings: one pydantic model, ``args:`` of ``serving/config.yaml`` and the options of
``metarestore serve``. Every resource a request can take is bounded here (unknown keys are an error)."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from serving.limits import DEFAULT_MAX_ASPECT, DEFAULT_MAX_BODY_MB, DEFAULT_MAX_PIXELS


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
    num_cpus: float = Field(0.5, gt=0, description="CPUs Ray reserves per Restorer replica (``metarestore "
                            "serve`` with one local replica: every CPU of its Ray, ``whole_machine``).")
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
    adapt_validation_steps: int | None = Field(None, ge=1, description="Gradient steps of each adapted candidate "
                                               "path in path=auto's validation. None: the request's steps, and "
                                               "the chosen path keeps the average of its validated fold states "
                                               "(no second fit); fewer: the chosen path is fitted again on all "
                                               "pairs with the request's steps.")
    adapt_budget_s: float | None = Field(0.6, gt=0, description="Wall-clock seconds for an adapter's fit, the "
                                         "chosen path's final fit included: adapted (and hqs) candidates whose "
                                         "steps predict that they would pass it are stopped or not started "
                                         "(never chosen, listed in the adapter's skipped). None: no budget. 0.6: "
                                         "with what it does not bound (the plain candidates, the request around "
                                         "the fit) a request stays under 0.7 s on 2 cores, one adapted "
                                         "candidate validated.")
    adapt_score_side: int | None = Field(64, ge=8, description="Candidate paths are scored on one window of this "
                                         "side of each held-out pair, at a corner of its own per fold (the same "
                                         "pixels for all; 4x fewer pixels to pre-step and restore than 128 px "
                                         "pairs). None: whole pairs.")
    adapt_patch: int = Field(32, ge=8, description="Each gradient step of an adapter fit sees one random window "
                             "of this side per pair (an adapted FiLM/LoRA state acts alike everywhere in an "
                             "image, so windows give nearly the whole pairs' gradient at a fraction of the cost).")
    auto_paths: list[str] | None = Field(None, description="The candidate paths of path=auto (names as "
                                         "metarestore.operators.paths.Path.parse reads them; default: the core's "
                                         "default_paths()).")
    adapter_ttl_s: float = Field(3600.0, gt=0, description="Adapters expire this long after creation.")
    adapter_max_mb: float = Field(256.0, gt=0, description="Memory for adapters; least recently used go first.")
    adapter_dir: str | None = Field(None, description="Where adapters are persisted: a directory or an fsspec "
                                    "URI (s3://, gs://, a shared volume). Default: METARESTORE_CACHE/adapters "
                                    "(~/.cache/metarestore/adapters) on the store's node.")

    def torch_threads(self) -> int:
        """The OpenMP threads of each compute thread: ``threads``, else the reserved CPUs (rounded, >= 1)."""
        return self.threads or max(1, round(self.num_cpus))

    def bearer_token(self) -> str | None:
        """The token every route but /healthz requires: ``token``, or ``token_env`` read in the replica's
        environment (never serving open when a token was asked for), or None."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_env:
            value = os.environ.get(self.token_env)
            if not value:
                raise RuntimeError(f"token_env {self.token_env} is not set in the replica's environment")
            return value
        return None


def whole_machine(cfg: AppArgs, cpus: float) -> AppArgs:
    """``cfg`` for a lone replica that has the machine (``metarestore serve`` without --replicas, --address or
    --cpus-per-replica): it reserves all ``cpus`` of the local Ray (Serve's proxy, controller and the adapter
    store reserve none, so it can be placed) and its one compute thread runs every forward pass on that many
    OpenMP threads. A lone request then gets the machine's speed; concurrent ones share passes in the batcher
    (compute_slots 1: two OpenMP teams on the same cores slow each other ~2x). ``threads`` if set is kept."""
    cpus = max(1, int(cpus))
    return cfg.model_copy(update={"num_cpus": float(cpus), "threads": cfg.threads or cpus})
