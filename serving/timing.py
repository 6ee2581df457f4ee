"""The ``Server-Timing`` header: where a request's time went on the replica."""

from __future__ import annotations

import time


class ServerTiming:
    """Durations in ms, in the order measured, plus the total since the timing began."""

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
