"""The parse sandbox: real worker processes, killed on time and memory limits, then replaced."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from contracts.errors import Permanent, Transient
from stages.kit.sandbox import Sandbox

TIMEOUT_S = 2.0
MEMORY_MB = 512


# Calls the workers run: module-level, so they pickle by name.


def add(a: int, b: int) -> int:
    return a + b


def refuse(code: str) -> None:
    raise Permanent(f"Refused with {code}; upload another file.", code=code)


def fail_plainly() -> None:
    raise ValueError("an ordinary bug")


def sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def announce_then_sleep(marker: str, seconds: float) -> None:
    open(marker, "w").close()
    time.sleep(seconds)


def allocate(megabytes: int) -> int:
    return len(bytearray(megabytes * 1024 * 1024))


_HELD: list[bytes] = []


def hold(megabytes: int) -> int:
    """Keep `megabytes` resident in the worker, as a leaking parser would; returns its pid."""
    _HELD.append(b"x" * (megabytes * 1024 * 1024))
    return os.getpid()


def segfault() -> None:
    ctypes.string_at(0)


def die_by_sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def unpicklable_result() -> object:
    return lambda: None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def eventually(condition: Callable[[], bool], deadline_s: float = 10.0) -> None:
    """Wait for a condition another process brings about, with a deadline."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
async def sandbox() -> AsyncIterator[Sandbox]:
    """Two workers with a short time limit and a small memory limit, shared by the tests."""
    # Preloading this module keeps its import out of the first call's time limit.
    pool = Sandbox(2, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB, preload=[__name__])
    await pool.start()
    yield pool
    pids = pool.pids()
    await pool.close()
    assert pool.pids() == frozenset()
    assert not any(alive(pid) for pid in pids)


async def still_works(sandbox: Sandbox, gone: frozenset[int]) -> None:
    """The killed worker is reaped, replaced, and every worker takes calls again."""
    assert len(gone) == 1
    assert not any(alive(pid) for pid in gone)
    # Idle workers are taken in turn, so calls reach the replacement once it has started.
    seen: set[int] = set()
    deadline = time.monotonic() + 30
    while len(seen) < sandbox.size or seen != sandbox.pids():
        assert time.monotonic() < deadline, f"calls reached {seen}, workers {sandbox.pids()}"
        seen.add(await sandbox.run(sleep, 0))
    assert not gone & seen


async def test_returns_results_from_worker_processes(sandbox: Sandbox) -> None:
    assert await sandbox.run(add, 2, 3) == 5
    pid = await sandbox.run(sleep, 0)
    assert pid != os.getpid() and pid in sandbox.pids()


async def test_permanent_comes_back_with_its_code_and_message(sandbox: Sandbox) -> None:
    before = sandbox.pids()
    with pytest.raises(Permanent) as caught:
        await sandbox.run(refuse, "too_odd")
    assert caught.value.code == "too_odd"
    assert caught.value.message == "Refused with too_odd; upload another file."
    with pytest.raises(ValueError, match="an ordinary bug"):
        await sandbox.run(fail_plainly)
    with pytest.raises(Exception, match="pickle"):
        await sandbox.run(unpicklable_result)
    assert sandbox.pids() == before  # errors a worker survives do not cost a worker


async def test_a_call_past_the_time_limit_is_killed(sandbox: Sandbox) -> None:
    before = sandbox.pids()
    started = time.monotonic()
    with pytest.raises(Permanent) as caught:
        await sandbox.run(sleep, 60)
    assert time.monotonic() - started < TIMEOUT_S + 5
    assert caught.value.code == "parse_timeout"
    assert "SLUICE_PARSE_TIMEOUT_S" in caught.value.message
    await still_works(sandbox, before - sandbox.pids())


async def test_a_call_past_the_memory_limit_is_stopped(sandbox: Sandbox) -> None:
    assert await sandbox.run(allocate, 64) == 64 << 20
    before = sandbox.pids()
    with pytest.raises(Permanent) as caught:
        await sandbox.run(allocate, 2 * MEMORY_MB)
    assert caught.value.code == "parse_memory_exceeded"
    assert f"{MEMORY_MB:,} MB (SLUICE_PARSE_MEMORY_MB)" in caught.value.message
    # A worker that ran out of memory is not trusted with another document.
    await still_works(sandbox, before - sandbox.pids())


async def test_a_worker_killed_from_outside_counts_as_out_of_memory(sandbox: Sandbox) -> None:
    before = sandbox.pids()
    with pytest.raises(Permanent) as caught:
        await sandbox.run(die_by_sigkill)
    assert caught.value.code == "parse_memory_exceeded"
    await still_works(sandbox, before - sandbox.pids())


async def test_a_crashing_parser_is_reported_and_replaced(sandbox: Sandbox) -> None:
    before = sandbox.pids()
    with pytest.raises(Permanent) as caught:
        await sandbox.run(segfault)
    assert caught.value.code == "parser_crashed"
    assert "SIGSEGV" in caught.value.message
    await still_works(sandbox, before - sandbox.pids())


async def test_calls_run_in_parallel_and_leave_the_event_loop_free(sandbox: Sandbox) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    pids = await asyncio.gather(sandbox.run(sleep, 1.0), sandbox.run(sleep, 1.0))
    elapsed = time.monotonic() - started
    ticker.cancel()
    assert len(set(pids)) == 2
    assert elapsed < 1.9  # one after the other would take 2s
    assert ticks >= 20


async def test_a_cancelled_call_kills_its_worker(sandbox: Sandbox, tmp_path: Path) -> None:
    before = sandbox.pids()
    marker = tmp_path / "started"
    call = asyncio.create_task(sandbox.run(announce_then_sleep, str(marker), 60))
    await eventually(marker.exists)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await sandbox.run(add, 1, 1) == 2
    killed = before - sandbox.pids()
    assert len(killed) == 1
    # After a cancel the worker is killed at once and reaped in the background.
    await eventually(lambda: not any(alive(pid) for pid in killed))


async def test_close_stops_every_worker() -> None:
    pool = Sandbox(1, timeout_s=TIMEOUT_S, preload=[__name__])
    await pool.start()
    (pid,) = pool.pids()
    assert await pool.run(add, 1, 2) == 3
    await pool.close()
    assert not alive(pid)
    with pytest.raises(Transient):
        await pool.run(add, 1, 2)


async def test_a_worker_grown_past_its_recycle_size_is_replaced_after_answering() -> None:
    pool = Sandbox(1, timeout_s=TIMEOUT_S, recycle_mb=150, preload=[__name__])
    await pool.start()
    try:
        small = await pool.run(hold, 1)
        assert await pool.run(sleep, 0) == small  # under the size: kept
        grown = await pool.run(hold, 200)  # the answer still arrives
        await eventually(lambda: not alive(grown) and len(pool.pids()) == 1)
        fresh = await pool.run(sleep, 0)
        assert fresh not in (small, grown)
        assert await pool.run(add, 2, 2) == 4
    finally:
        await pool.close()
