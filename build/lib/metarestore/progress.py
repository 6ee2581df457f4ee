"""A console progress line with step, loss, throughput and ETA, for whatever people wait for."""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    def __init__(self, total: int, start: int = 0, label: str = "step", stream=None):
        self.total, self.start, self.label = total, start, label
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stdout

    def rate(self, done: int) -> float:
        elapsed = time.perf_counter() - self.t0
        return (done - self.start) / elapsed if elapsed > 0 and done > self.start else 0.0

    def line(self, done: int, **fields: float | str) -> str:
        rate = self.rate(done)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        parts = [f"{self.label} {done}/{self.total} ({100 * done / max(1, self.total):.0f}%)"]
        for key, value in fields.items():
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        parts.append(f"ETA {format_duration(eta) if rate > 0 else '?'}")
        return " | ".join(parts)

    def print(self, done: int, **fields: float | str) -> None:
        self.write(self.line(done, **fields))

    def write(self, text: str) -> None:
        """One line straight to the stream, not through ``print``: Ray Train patches ``print`` in its
        workers to tee into its logger, and the driver would show every line twice."""
        self.stream.write(text + "\n")
        self.stream.flush()
