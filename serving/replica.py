"""One Restorer replica as the routes see it, and the process it runs in.

``Replica`` joins the Serve-free core (``serving/core.py``) to what only a served replica has: the
adapter store (a deployment handle shared by every replica), the cap on bodies read at once and the
replica's name for the answers' headers. ``REPLICA_ENV`` and ``tune_process`` set up the replica's
process for the speed measured in docs/benchmarks.md ("Serving at the speed of the model").
"""

from __future__ import annotations

import asyncio

import torch
from starlette.requests import Request

from serving.core import RestorerCore
from serving.errors import no_adapter
from serving.limits import ApiError, read_body
from serving.settings import AppArgs

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


def tune_process(cfg: AppArgs) -> None:
    """The replica process's own settings: torch on one thread outside the core's compute threads (once more
    OpenMP threads exist than cores, GNU OpenMP stops spinning and every forward pass slows ~2x), and
    PIL's decompression-bomb guard at the server's own pixel limit."""
    from PIL import Image

    torch.set_num_threads(1)
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels


class Replica:
    """The core, the adapter store and the upload cap of one replica: everything its routes use."""

    def __init__(self, core: RestorerCore, store, name: str):
        self.core, self.cfg, self.store, self.name = core, core.cfg, store, name
        self._uploads = asyncio.Semaphore(core.cfg.max_uploads)

    async def body(self, request: Request) -> bytes:
        """The body, read under the upload cap and the read timeouts: stalled clients cannot hold slots."""
        cfg = self.cfg
        if self._uploads.locked():
            raise ApiError(503, "too_many_uploads", f"{cfg.max_uploads} uploads are in progress on this "
                           "replica; retry shortly", headers={"Retry-After": "1"})
        async with self._uploads:
            return await read_body(request, int(cfg.max_body_mb * 2**20), cfg.body_timeout_s, cfg.body_deadline_s)

    def headers(self, adapter: str | None = None) -> dict[str, str]:
        return {"X-Model-Version": self.core.version, "X-Adapter": adapter or "none", "X-Replica": self.name}

    async def adapter(self, adapter_id: str):
        """The stored adapter, parsed against this replica's model (an ``Adapter``)."""
        found = await self.store.get.remote(adapter_id)
        if found is None:
            raise no_adapter(adapter_id)
        info, data = found
        if info.get("model_sha256") != self.core.model_sha256:
            raise ApiError(409, "adapter_model_mismatch", f"adapter {adapter_id} was made for another model; "
                           "create it again")
        return await self.core.read_adapter(data, adapter_id)
