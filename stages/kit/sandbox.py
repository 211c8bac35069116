"""Running parsers in worker processes, with a time and a memory limit on every call.

A parser fed a pathological file can loop for hours, inflate gigabytes or crash in C code. So
each call runs in one of a few long-lived worker processes, started once with `spawn` (they
share nothing with the stage's threads or its AMQP connection) and capped by `RLIMIT_AS`. A call
that overruns its time is killed with its worker, the worker is replaced in the background, and
the caller gets a `Permanent` error a person can act on. The event loop only ever awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import logging
import multiprocessing
import pickle
import resource
import signal
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from typing import Any, TypeVar, TypeVarTuple

from contracts.errors import Permanent, Transient
from stages.infra import memory

log = logging.getLogger(__name__)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_READY = "ready"
# A worker imports its modules before it is ready; that time never counts against a call.
_BOOT_TIMEOUT_S = 60.0
_JOIN_TIMEOUT_S = 5.0
_RESPAWN_DELAYS_S = (0.5, 2.0, 10.0, 30.0)
# ("ok", result) | ("error", exception) | ("memory" | "died", None), and whether the worker
# is exiting after this answer (it outgrew `recycle_mb`).
Outcome = tuple[str, Any, bool]


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection


class Sandbox:
    """A fixed pool of worker processes; `run(fn, *args)` runs one call in one of them."""

    def __init__(
        self,
        workers: int,
        *,
        timeout_s: float,
        memory_mb: int | None = None,
        recycle_mb: int | None = None,
        preload: Sequence[str] = (),
        work: str = "Parsing the document",
        timeout_setting: str = "SLUICE_PARSE_TIMEOUT_S",
        memory_setting: str = "SLUICE_PARSE_MEMORY_MB",
    ) -> None:
        self.size = workers
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        # How its errors name the work and the settings that limit it.
        self.work = work
        self.timeout_setting = timeout_setting
        self.memory_setting = memory_setting
        self.recycle_mb = recycle_mb
        self._preload = tuple(preload)
        self._context = multiprocessing.get_context("spawn")
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._workers: set[_Worker] = set()
        self._respawns: set[asyncio.Task[None]] = set()
        self._reaping: set[asyncio.Task[int | None]] = set()
        self._closed = False
        # A sandbox dropped without close() (a test, a failed startup) leaves no processes.
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    async def start(self) -> None:
        """Start every worker and wait until each has imported its modules."""
        started = await asyncio.gather(
            *(self._spawn() for _ in range(self.size)), return_exceptions=True
        )
        for outcome in started:
            if isinstance(outcome, _Worker):
                self._idle.put_nowait(outcome)
        failures = [outcome for outcome in started if isinstance(outcome, BaseException)]
        if failures:
            await self.close()
            raise failures[0]

    def pids(self) -> frozenset[int]:
        """The process ids of the current workers."""
        return frozenset(w.process.pid for w in self._workers if w.process.pid is not None)

    async def run(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """`fn(*args)` in a worker; `fn` and its arguments must pickle (module-level `fn`).

        An exception `fn` raises comes back as itself; a call past `timeout_s`, past
        `memory_mb`, or one that crashes its worker raises `Permanent`.
        """
        if self._closed:
            raise Transient("The parse sandbox is shut down; the stage is stopping.")
        payload = bytes(ForkingPickler.dumps((fn, args)))  # fails here, before a worker is taken
        worker = await self._idle.get()
        try:
            kind, value, exiting = await asyncio.wait_for(
                asyncio.to_thread(_exchange, worker.conn, payload), self.timeout_s
            )
        except TimeoutError:
            await self._retire(worker, kill=True)
            raise self._timed_out() from None
        except BaseException:
            # Cancelled mid-call, or an undecodable answer: the worker's state is unknown.
            self._retire_soon(worker)
            raise
        if kind in ("ok", "error"):
            if exiting:
                # Grown past `recycle_mb`: it exits by itself; a fresh one takes its place.
                self._retire_soon(worker, kill=False)
            else:
                self._idle.put_nowait(worker)
            if kind == "error":
                raise value
            result: T = value
            return result
        exitcode = await self._retire(worker, kill=False)
        if self._closed:
            raise Transient("The parse stage stopped while parsing; the document will be retried.")
        if kind == "memory" or exitcode == -signal.SIGKILL:
            # SIGKILL from anyone but us is the kernel's OOM killer (or a cgroup limit).
            raise self._out_of_memory()
        raise _crashed(exitcode)

    async def close(self) -> None:
        """Stop every worker: idle ones exit cleanly, busy ones are killed after a short grace."""
        self._closed = True
        for task in self._respawns:
            task.cancel()
        await asyncio.gather(*self._respawns, *self._reaping, return_exceptions=True)
        while not self._idle.empty():
            with contextlib.suppress(OSError):
                self._idle.get_nowait().conn.send(None)
        workers = list(self._workers)
        await asyncio.to_thread(_stop_all, workers)
        self._workers.clear()
        self._finalizer.detach()

    async def _spawn(self) -> _Worker:
        ours, theirs = self._context.Pipe()
        memory_bytes = self.memory_mb * 1024 * 1024 if self.memory_mb else None
        process = self._context.Process(
            target=_serve,
            args=(theirs, memory_bytes, self.recycle_mb, self._preload),
            name="sluice-sandbox",
            daemon=True,  # never outlive the stage, even if it dies without closing us
        )
        await asyncio.to_thread(process.start)
        theirs.close()
        worker = _Worker(process, ours)
        self._workers.add(worker)
        try:
            hello = await asyncio.wait_for(asyncio.to_thread(_receive, ours), _BOOT_TIMEOUT_S)
        except BaseException:
            await self._retire(worker, kill=True, replace=False)
            raise
        if hello != ("ok", _READY, False):
            await self._retire(worker, kill=False, replace=False)
            raise RuntimeError(
                f"A parse worker failed to start (exit code {process.exitcode}); see its output "
                "above. Check that the stage's environment can import the parsers."
            )
        return worker

    async def _retire(self, worker: _Worker, *, kill: bool, replace: bool = True) -> int | None:
        """Reap a worker (killing it first if `kill`); its exit code. Replaced unless closed."""
        self._workers.discard(worker)
        exitcode = await asyncio.to_thread(_reap, worker, kill)
        if replace and not self._closed:
            self._respawn()
        return exitcode

    def _retire_soon(self, worker: _Worker, *, kill: bool = True) -> None:
        # Called while being cancelled (kill now: a syscall) or for a worker exiting by itself:
        # reap and replace in the background.
        self._workers.discard(worker)
        if kill:
            worker.process.kill()
        task = asyncio.create_task(asyncio.to_thread(_reap, worker, kill))
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)
        if not self._closed:
            self._respawn()

    def _respawn(self) -> None:
        task = asyncio.create_task(self._respawn_until_started())
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _respawn_until_started(self) -> None:
        for attempt in itertools.count():
            try:
                self._idle.put_nowait(await self._spawn())
                return
            except Exception:
                delay_s = _RESPAWN_DELAYS_S[min(attempt, len(_RESPAWN_DELAYS_S) - 1)]
                log.exception("could not replace a parse worker; trying again in %gs", delay_s)
                await asyncio.sleep(delay_s)

    def _timed_out(self) -> Permanent:
        return Permanent(
            f"{self.work} took longer than {self.timeout_s:g}s "
            f"({self.timeout_setting}) and was stopped; the file is too large or too complex. "
            "Split it into smaller files, or re-export it (e.g. print it to PDF), and upload "
            "them.",
            code="parse_timeout",
        )

    def _out_of_memory(self) -> Permanent:
        limit = f"{self.memory_mb:,} MB" if self.memory_mb else "the memory available"
        return Permanent(
            f"{self.work} needed more than {limit} ({self.memory_setting}) and was "
            "stopped; the file is too large or built to exhaust memory. Split it into smaller "
            "files and upload them.",
            code="parse_memory_exceeded",
        )


def _crashed(exitcode: int | None) -> Permanent:
    how = f"exit code {exitcode}"
    if exitcode is not None and exitcode < 0:
        try:
            how = f"signal {signal.Signals(-exitcode).name}"
        except ValueError:  # a signal without a name (real-time signals)
            how = f"signal {-exitcode}"
    return Permanent(
        f"The parser crashed on this file ({how}); the file is probably damaged. Re-export it "
        "(e.g. save it again, or print it to PDF) and upload it again.",
        code="parser_crashed",
    )


# ---- In the stage process, on a worker thread: blocking pipe and process calls. ----


def _exchange(conn: Connection, payload: bytes) -> Outcome:
    try:
        conn.send_bytes(payload)
    except OSError:
        return ("died", None, True)
    return _receive(conn)


def _receive(conn: Connection) -> Outcome:
    try:
        data = conn.recv_bytes()
    except (EOFError, OSError):
        return ("died", None, True)
    outcome: Outcome = pickle.loads(data)
    return outcome


def _reap(worker: _Worker, kill: bool) -> int | None:
    if kill:
        worker.process.kill()
    else:
        # A worker that failed exits on its own: wait for it, so its exit code says why.
        worker.process.join(_JOIN_TIMEOUT_S)
    exitcode = worker.process.exitcode
    if exitcode is None:
        worker.process.kill()
    worker.process.join()
    worker.conn.close()
    return exitcode


def _stop_all(workers: Iterable[_Worker]) -> None:
    workers = list(workers)
    for worker in workers:
        worker.process.join(_JOIN_TIMEOUT_S / max(len(workers), 1))
    for worker in workers:
        if worker.process.exitcode is None:
            worker.process.kill()
        worker.process.join()
        worker.conn.close()


def _kill_all(workers: set[_Worker]) -> None:
    for worker in workers:
        with contextlib.suppress(Exception):
            worker.process.kill()


# ---- In the worker process. ----


def _serve(
    conn: Connection, memory_bytes: int | None, recycle_mb: int | None, preload: tuple[str, ...]
) -> None:
    """A worker's life: import, cap its address space, then run calls until told to stop or
    grown past `recycle_mb`."""
    # Ctrl-C reaches the whole process group; the stage decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for module in preload:
        importlib.import_module(module)
    if memory_bytes is not None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    conn.send(("ok", _READY, False))
    while True:
        try:
            call = conn.recv()
        except EOFError:
            return  # the stage is gone
        if call is None:
            return
        kind, value = _call(*call)
        # After a failed allocation a C library may be in any state: start afresh.
        exiting = kind == "memory" or _outgrown(recycle_mb)
        try:
            conn.send((kind, value, exiting))
        except MemoryError:
            conn.send(("memory", None, True))
            return
        except Exception as exc:  # the result would not pickle
            conn.send(("error", _portable(exc), exiting))
        if exiting:
            return


def _outgrown(recycle_mb: int | None) -> bool:
    """Whether this worker holds more than `recycle_mb` even after giving freed memory back.

    Parsers leave the heap fragmented (python-docx/lxml most of all: ~0.1 MB per document
    that glibc keeps), so a long-lived worker would creep upwards by itself.
    """
    memory.give_back()
    if recycle_mb is None:
        return False
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * resource.getpagesize() > recycle_mb * 1024 * 1024


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[str, Any]:
    try:
        return ("ok", fn(*args))
    except MemoryError:
        # Leaving this block drops the traceback and whatever its frames held.
        return ("memory", None)
    except Exception as exc:
        return ("error", _portable(exc))


def _portable(exc: Exception) -> Exception:
    """`exc` if it survives a pickle round trip, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc
