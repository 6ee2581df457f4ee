"""The serving batcher: a lone request is not held back; requests that queue while the model is busy
share the next pass; a failing pass fails only its own requests."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.batching import Batcher


def test_lone_requests_go_through_alone_and_a_backlog_forms_one_batch():
    release = threading.Event()
    seen: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        seen.append(list(items))
        if items == [0]:
            release.wait(30)  # the model is "busy" with the first request while the others queue
        return [i * 10 for i in items]

    async def scenario() -> list[int]:
        batcher = Batcher(run, max_batch_size=4)
        first = asyncio.create_task(batcher.submit(0))
        while not seen:  # the first pass has started
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 7)]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(first, *rest)

    results = asyncio.run(scenario())
    assert results == [i * 10 for i in range(7)]
    assert seen[0] == [0]  # alone: nothing else was queued, and it did not wait for company
    assert seen[1] == [1, 2, 3, 4] and seen[2] == [5, 6]  # the backlog, max_batch_size at a time, in order


def test_a_failing_batch_fails_its_requests_and_the_batcher_lives_on():
    def run(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return items

    async def scenario():
        batcher = Batcher(run, max_batch_size=8)
        with pytest.raises(ValueError, match="unlucky"):
            await batcher.submit(13)
        return await batcher.submit(7)

    assert asyncio.run(scenario()) == 7


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError):
        Batcher(lambda items: items, max_batch_size=0)
