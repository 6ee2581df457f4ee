"""The adapter store: the one place every replica finds the adapters that any replica made.

An adapter is the small delta of the adapted parameters (``metarestore.meta.adapt.delta``). The store
keeps them in memory with a time-to-live and a byte budget, evicting the least recently used first.
It runs as a single-replica Serve deployment next to the restorer, so it lives and dies with the
application; a restart loses the adapters, which clients simply create again.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import torch
from ray import serve

Delta = dict[str, torch.Tensor]


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class _Entry:
    delta: Delta
    info: dict
    nbytes: int
    expires: float


class AdapterStore:
    """Adapters by id, with a time-to-live from creation and an LRU byte budget."""

    def __init__(self, ttl_s: float = 3600.0, max_bytes: int = 256 * 2**20,
                 clock: Callable[[], float] = time.time):
        if ttl_s <= 0 or max_bytes <= 0:
            raise ValueError("adapter ttl_s and max_bytes must be positive")
        self.ttl_s, self.max_bytes, self.clock = float(ttl_s), int(max_bytes), clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, delta: Delta, info: dict) -> dict:
        """Store a delta under a new unguessable id; returns ``info`` plus id, size and expiry."""
        nbytes = sum(t.element_size() * t.nelement() for t in delta.values())
        if nbytes > self.max_bytes:
            raise ValueError(f"adapter of {nbytes} bytes exceeds the store's {self.max_bytes} bytes")
        now = self.clock()
        adapter_id = secrets.token_urlsafe(12)
        info = {**info, "adapter_id": adapter_id, "bytes": nbytes, "created_at": iso(now),
                "expires_at": iso(now + self.ttl_s)}
        with self._lock:
            self._expire(now)
            while self._entries and self._bytes + nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[adapter_id] = _Entry({k: v.detach().cpu() for k, v in delta.items()}, info, nbytes,
                                               now + self.ttl_s)
            self._bytes += nbytes
        return dict(info)

    def get(self, adapter_id: str) -> tuple[dict, Delta] | None:
        """(info, delta) and mark it recently used; None when unknown, expired or evicted."""
        with self._lock:
            entry = self._live(adapter_id)
            if entry is None:
                return None
            self._entries.move_to_end(adapter_id)
            return dict(entry.info), entry.delta

    def info(self, adapter_id: str) -> dict | None:
        with self._lock:
            entry = self._live(adapter_id)
            return None if entry is None else dict(entry.info)

    def delete(self, adapter_id: str) -> bool:
        with self._lock:
            if self._live(adapter_id) is None:
                return False
            self._drop(adapter_id)
            return True

    def stats(self) -> dict:
        with self._lock:
            self._expire(self.clock())
            return {"adapters": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "ttl_s": self.ttl_s}

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
        self._bytes -= self._entries.pop(adapter_id).nbytes


# One replica by design (the store is the single source of truth); it needs no CPU of its own.
AdapterStoreDeployment = serve.deployment(AdapterStore, name="AdapterStore", num_replicas=1,
                                          max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
