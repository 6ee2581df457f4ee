"""Dynamic batching that never waits on an idle replica.

Ray Serve's ``@serve.batch`` (2.60) waits ``batch_wait_timeout_s`` after the first request even when no
other request is coming, and it fixes a batch's members as soon as that window closes, before the model
is free: while one forward pass runs, the requests that arrive form batches of one or two that then queue
for the model. Here a batch is formed at the moment the model becomes free, from every request that
queued meanwhile: a lone request goes straight through, and under load batches grow to the backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Runs ``run(items) -> results`` (blocking; on a thread of ``executor``) on batches of submitted items.

    ``workers`` batches run at once; ``wait_s`` > 0 additionally waits that long for a batch to fill when
    fewer than ``max_batch_size`` are queued (0: never wait)."""

    def __init__(self, run: Callable[[list[T]], list[R]], max_batch_size: int, workers: int = 1,
                 wait_s: float = 0.0, executor: Executor | None = None):
        if max_batch_size < 1 or workers < 1 or wait_s < 0:
            raise ValueError("max_batch_size and workers must be >= 1 and wait_s >= 0")
        self.run, self.max_batch_size, self.workers, self.wait_s = run, max_batch_size, workers, wait_s
        self.executor = executor  # where ``run`` runs (None: asyncio's default thread pool)
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] | None = None
        self._tasks: list[asyncio.Task] = []

    async def submit(self, item: T) -> R:
        if self._queue is None:  # created on first use: the replica's event loop is running by then
            self._queue = asyncio.Queue()
            self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def aclose(self) -> None:
        """Stop the workers (requests still queued are cancelled); a later ``submit`` starts new ones."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._queue is not None:
            while not self._queue.empty():
                self._queue.get_nowait()[1].cancel()
        self._queue, self._tasks = None, []

    def _take(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        assert self._queue is not None
        while len(batch) < self.max_batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            self._take(batch)
            if self.wait_s > 0 and len(batch) < self.max_batch_size:
                await asyncio.sleep(self.wait_s)
                self._take(batch)
            batch = [(item, f) for item, f in batch if not f.done()]  # clients that gave up cost nothing
            if not batch:
                continue
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.run, [item for item, _ in batch])
            except Exception as exc:  # every waiting request gets the error, the worker lives on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
