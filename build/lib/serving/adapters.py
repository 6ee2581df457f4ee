"""The adapter store: the one place every replica finds the adapters that any replica made.

An adapter is the serialised ``metarestore.operators.adapter.Adapter`` (``Adapter.to_bytes()``: its path,
fitted operators and FiLM parameters as safetensors with a JSON header, never a pickle); the store holds
those bytes without interpreting them (the replicas parse them against their model). Adapters stored by
earlier versions (a safetensors file of FiLM deltas, ``metarestore.meta.adapt.delta``) are kept as they
are; the replicas still read them. The store keeps adapters in memory with a time-to-live and a byte
budget, evicting the least recently used first, and writes each one through to storage on creation:
``ID.safetensors`` (the adapter) and ``ID.json``
(what the API reports), each written atomically (a temporary name, then a rename; the JSON last, so a
JSON file means a complete adapter). Storage is a local directory or any fsspec URI (``s3://``,
``gs://``, a shared volume), so a restarted store replica, application or redeploy reloads every
adapter that has not expired. Expired, evicted and deleted adapters are removed from storage too.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from ray import serve

logger = logging.getLogger(__name__)


def default_adapter_dir() -> str:
    """METARESTORE_CACHE/adapters (~/.cache/metarestore/adapters) of the machine that asks."""
    from metarestore.hub import CACHE

    return str(CACHE / "adapters")


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class _Entry:
    data: bytes
    info: dict
    nbytes: int
    expires: float


class AdapterStore:
    """Adapters by id, with a time-to-live from creation and an LRU byte budget; optionally durable.

    ``root``: a directory or fsspec URI to persist adapters under (None: memory only).
    """

    def __init__(self, ttl_s: float = 3600.0, max_bytes: int = 256 * 2**20, root: str | None = None,
                 clock: Callable[[], float] = time.time):
        if ttl_s <= 0 or max_bytes <= 0:
            raise ValueError("adapter ttl_s and max_bytes must be positive")
        self.ttl_s, self.max_bytes, self.clock = float(ttl_s), int(max_bytes), clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._lock = threading.Lock()
        self._dropped: list[str] = []  # forgotten under the lock, removed from storage after it
        self.fs, self.root = None, None
        if root is not None:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(root)
            self.root = self.root.rstrip("/")
            self.fs.makedirs(self.root, exist_ok=True)
            self._reload()

    def put(self, data: bytes, info: dict) -> dict:
        """Store an adapter's bytes under a new unguessable id; returns ``info`` plus id, size and expiry."""
        data = bytes(data)
        nbytes = len(data)
        if nbytes > self.max_bytes:
            raise ValueError(f"adapter of {nbytes} bytes exceeds the store's {self.max_bytes} bytes")
        now = self.clock()
        adapter_id = secrets.token_urlsafe(12)
        info = {**info, "adapter_id": adapter_id, "bytes": nbytes, "created_at": iso(now),
                "expires_at": iso(now + self.ttl_s)}
        entry = _Entry(data, info, nbytes, now + self.ttl_s)
        self._persist(adapter_id, entry)  # on storage before anyone is told the id
        self._insert(adapter_id, entry, now)
        return dict(info)

    def get(self, adapter_id: str) -> tuple[dict, bytes] | None:
        """(info, adapter bytes) and mark it recently used; None when unknown, expired or evicted."""
        with self._locked():
            entry = self._live(adapter_id)
            if entry is None:
                return None
            self._entries.move_to_end(adapter_id)
            return dict(entry.info), entry.data

    def info(self, adapter_id: str) -> dict | None:
        with self._locked():
            entry = self._live(adapter_id)
            return None if entry is None else dict(entry.info)

    def infos(self) -> list[dict]:
        """Every live adapter's info, oldest first."""
        with self._locked():
            self._expire(self.clock())
            infos = [dict(e.info) for e in self._entries.values()]
        return sorted(infos, key=lambda i: i["created_at"])

    def delete(self, adapter_id: str) -> bool:
        with self._locked():
            if self._live(adapter_id) is None:
                return False
            self._drop(adapter_id)
            return True

    def stats(self) -> dict:
        with self._locked():
            self._expire(self.clock())
            return {"adapters": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "ttl_s": self.ttl_s}

    # storage ----------------------------------------------------------------------------------------
    def _path(self, adapter_id: str, suffix: str) -> str:
        return f"{self.root}/{adapter_id}{suffix}"

    def _write(self, path: str, data: bytes) -> None:
        """Atomically: a reader sees the whole file or none (rename on a file system, one PUT on a bucket)."""
        tmp = f"{self.root}/.tmp-{secrets.token_hex(8)}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)

    def _persist(self, adapter_id: str, entry: _Entry) -> None:
        if self.fs is None:
            return
        self._write(self._path(adapter_id, ".safetensors"), entry.data)
        record = {"info": entry.info, "expires": entry.expires}
        self._write(self._path(adapter_id, ".json"), json.dumps(record).encode())  # last: marks it complete

    def _unpersist(self, adapter_ids: list[str]) -> None:
        if self.fs is None:
            return
        for adapter_id in adapter_ids:
            for suffix in (".json", ".safetensors"):  # the JSON first: a half-deleted adapter is no adapter
                try:
                    self.fs.rm(self._path(adapter_id, suffix))
                except FileNotFoundError:
                    pass
                except OSError as exc:  # storage trouble must not fail the request that evicted it
                    logger.warning("could not delete adapter %s%s: %s", adapter_id, suffix, exc)

    def _reload(self) -> None:
        """Load every stored adapter; expired or unreadable ones are removed, the oldest go first if over budget."""
        now, loaded, gone = self.clock(), [], []
        for path in self.fs.glob(f"{self.root}/*.json"):
            adapter_id = path.rsplit("/", 1)[-1][: -len(".json")]
            try:
                record = json.loads(self.fs.cat_file(path))
                if record["expires"] <= now:
                    gone.append(adapter_id)
                    continue
                data = self.fs.cat_file(self._path(adapter_id, ".safetensors"))
            except Exception as exc:  # one bad file must not keep the store from starting
                logger.warning("skipping stored adapter %s: %s", adapter_id, exc)
                continue
            loaded.append((record["info"]["created_at"], adapter_id, _Entry(data, record["info"], len(data),
                                                                             record["expires"])))
        self._unpersist(gone)
        for _, adapter_id, entry in sorted(loaded, key=lambda t: t[0]):
            self._insert(adapter_id, entry, now)
        logger.info("adapter store at %s: %d adapter(s) loaded, %d expired", self.root, len(self._entries),
                    len(gone))

    def _insert(self, adapter_id: str, entry: _Entry, now: float) -> None:
        with self._locked():
            self._expire(now)
            while self._entries and self._bytes + entry.nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[adapter_id] = entry
            self._bytes += entry.nbytes

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The lock; what was dropped under it leaves storage after it is released (no I/O under the lock)."""
        try:
            with self._lock:
                yield
        finally:
            with self._lock:
                dropped, self._dropped = self._dropped, []
            self._unpersist(dropped)

    # under the lock ---------------------------------------------------------------------------------
    def _live(self, adapter_id: str) -> _Entry | None:
        entry = self._entries.get(adapter_id)
        if entry is not None and entry.expires <= self.clock():
            self._drop(adapter_id)
            return None
        return entry

    def _expire(self, now: float) -> None:
        for adapter_id in [k for k, e in self._entries.items() if e.expires <= now]:
            self._drop(adapter_id)

    def _drop(self, adapter_id: str) -> None:
        """Forget it; its stored copy is removed by the caller once the lock is released."""
        self._bytes -= self._entries.pop(adapter_id).nbytes
        self._dropped.append(adapter_id)


# One replica by design (the store is the single source of truth); it needs no CPU of its own.
AdapterStoreDeployment = serve.deployment(AdapterStore, name="AdapterStore", num_replicas=1,
                                          max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
