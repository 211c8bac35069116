"""The coalescer gathers concurrent submissions into shared calls and hands results back."""

from __future__ import annotations

import asyncio
import time

import pytest

from stages.kit.batching import Coalescer


class Recorder:
    """A call that doubles numbers and remembers each batch it was given."""

    def __init__(self, poison: int | None = None) -> None:
        self.calls: list[list[int]] = []
        self.poison = poison

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        if self.poison in items:
            raise ValueError(f"cannot take {self.poison}")
        return [2 * item for item in items]


async def test_concurrent_submissions_share_one_call() -> None:
    call = Recorder()
    coalescer = Coalescer(call, max_items=100, max_wait_s=0.2, name="test")
    results = await asyncio.gather(*(coalescer.submit([n, n + 100]) for n in range(5)))
    assert results == [[2 * n, 2 * (n + 100)] for n in range(5)]
    assert len(call.calls) == 1 and len(call.calls[0]) == 10


async def test_a_full_batch_goes_at_once_and_the_rest_follows() -> None:
    call = Recorder()
    coalescer = Coalescer(call, max_items=4, max_wait_s=30.0, name="test")
    started = time.monotonic()
    results = await asyncio.gather(*(coalescer.submit([n, n]) for n in range(4)))
    # Two full calls of 4: nobody waited for the 30 s deadline.
    assert time.monotonic() - started < 5
    assert results == [[2 * n, 2 * n] for n in range(4)]
    assert [len(c) for c in call.calls] == [4, 4]


async def test_a_lone_submission_waits_no_longer_than_the_deadline() -> None:
    call = Recorder()
    coalescer = Coalescer(call, max_items=100, max_wait_s=0.05, name="test")
    started = time.monotonic()
    assert await coalescer.submit([7]) == [14]
    assert time.monotonic() - started < 2


async def test_an_oversized_submission_still_goes_through_alone() -> None:
    call = Recorder()
    coalescer = Coalescer(call, max_items=3, max_wait_s=0.01, name="test")
    assert await coalescer.submit(list(range(10))) == [2 * n for n in range(10)]
    assert call.calls == [list(range(10))]


async def test_a_failing_item_fails_only_its_own_submission() -> None:
    call = Recorder(poison=13)
    coalescer = Coalescer(call, max_items=100, max_wait_s=0.2, name="test")
    good = [coalescer.submit([n]) for n in (1, 2)]
    bad = coalescer.submit([13])
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert results[:2] == [[2], [4]]
    assert isinstance(results[2], ValueError)
    with pytest.raises(ValueError):
        await coalescer.submit([13])
