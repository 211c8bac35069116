"""`sluice up`: run the gateway and the stage processes as children, restart them, stop them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from contracts.messages import StageName

_COLOURS = ("36", "32", "33", "35", "34", "91", "96", "92")
_SELF = "sluice"


@dataclass(frozen=True)
class ChildSpec:
    """One supervised process: its log name and its command line."""

    name: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Backoff:
    """Restart delays: `initial_s` doubling to `max_s`, back to `initial_s` after a good run."""

    initial_s: float = 1.0
    max_s: float = 30.0
    reset_after_s: float = 60.0


def sluice_command() -> list[str]:
    """How to run `sluice` itself: the console script beside this Python, else `-m`."""
    script = Path(sys.executable).parent / "sluice"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "gateway.cli.main"]


def default_children(stages: Sequence[StageName], gateway: bool = True) -> list[ChildSpec]:
    """The gateway (unless disabled) and one process per chosen stage, side stages included
    (each shows in `ps` as `sluice stage NAME`)."""
    command = sluice_command()
    children = [ChildSpec("gateway", (*command, "gateway"))] if gateway else []
    children += [ChildSpec(stage, (*command, "stage", stage)) for stage in stages]
    return children


class Supervisor:
    """Keeps every child running until `stop()`, then terminates them all."""

    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        backoff: Backoff = Backoff(),
        # Longer than a stage's drain (stages/runtime/runner.py: 30 s), so a stopping stage
        # finishes or hands back what it holds before it is killed.
        stop_timeout_s: float = 35.0,
        out: TextIO | None = None,
        colour: bool | None = None,
    ) -> None:
        self._children = list(children)
        self._backoff = backoff
        self._stop_timeout_s = stop_timeout_s
        self._out = out if out is not None else sys.stdout
        if colour is None:
            colour = self._out.isatty() and "NO_COLOR" not in os.environ
        width = max(len(name) for name in [_SELF, *(child.name for child in children)])
        self._prefix = {
            name: (
                f"\x1b[{_COLOURS[i % len(_COLOURS)]}m[{name:<{width}}]\x1b[0m "
                if colour
                else f"[{name:<{width}}] "
            )
            for i, name in enumerate([_SELF, *(child.name for child in children)])
        }
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()

    def log(self, name: str, line: str) -> None:
        """Write one line under a child's (or the supervisor's) prefix."""
        try:
            self._out.write(self._prefix[name] + line + "\n")
            self._out.flush()
        except (BrokenPipeError, ValueError):
            # Whoever read our output (`| tee`, a closed terminal) is gone; supervising
            # must go on, and stopping above all must not depend on being heard.
            pass

    def stop(self) -> None:
        """Begin a graceful stop; a second call kills the stragglers at once."""
        if self._stopping.is_set():
            self._force.set()
            self.log(_SELF, "killing every process now")
            return
        self._stopping.set()
        self.log(
            _SELF,
            f"stopping: each process finishes what it holds (up to {self._stop_timeout_s:g}s; "
            "Ctrl-C again to kill now)",
        )

    async def run(self) -> int:
        """Supervise until `stop()`; returns 0 once every child is gone."""
        names = ", ".join(child.name for child in self._children)
        self.log(_SELF, f"starting {names} (Ctrl-C stops all)")
        await asyncio.gather(*(self._keep_running(child) for child in self._children))
        self.log(_SELF, "all processes stopped")
        return 0

    async def _keep_running(self, child: ChildSpec) -> None:
        loop = asyncio.get_running_loop()
        delay_s = self._backoff.initial_s
        while not self._stopping.is_set():
            started = loop.time()
            try:
                transport, proc = await loop.subprocess_exec(
                    lambda: _Child(lambda line: self.log(child.name, line)),
                    *child.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    # Own process group: Ctrl-C reaches only us, and we can sweep grandchildren.
                    start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            except OSError as exc:
                self.log(_SELF, f"cannot start {child.name} ({' '.join(child.argv)}): {exc}")
                code: int | None = None
            else:
                self.log(_SELF, f"started {child.name} (pid {transport.get_pid()})")
                code = await self._watch(child, transport, proc)
            if self._stopping.is_set():
                return
            if loop.time() - started >= self._backoff.reset_after_s:
                delay_s = self._backoff.initial_s
            self.log(
                _SELF,
                f"{child.name} exited unexpectedly (code {code}) after "
                f"{loop.time() - started:.1f}s; restarting in {delay_s:g}s",
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay_s)
            delay_s = min(delay_s * 2, self._backoff.max_s)

    async def _watch(
        self, child: ChildSpec, transport: asyncio.SubprocessTransport, proc: _Child
    ) -> int | None:
        pid = transport.get_pid()
        exited = asyncio.create_task(proc.exited.wait())
        stopping = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not exited.done():
            _signal(pid, signal.SIGTERM, group=False)
            force = asyncio.create_task(self._force.wait())
            await asyncio.wait(
                {exited, force}, timeout=self._stop_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            force.cancel()
            if not exited.done():
                forced = self._force.is_set()
                late = f"{child.name} did not stop in time; killing it"
                self.log(_SELF, f"killing {child.name} as asked" if forced else late)
                _kill_group(pid)
                await exited
            self.log(_SELF, f"{child.name} {_how_it_stopped(transport.get_returncode())}")
        # Sweep what the child left behind, so nothing holds its port or its output pipe.
        _kill_group(pid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.closed.wait(), timeout=2.0)
        transport.close()
        return transport.get_returncode()


def _how_it_stopped(code: int | None) -> str:
    """How a child asked to stop (SIGTERM) ended, in words: uvicorn re-raises the SIGTERM it
    handled, so a gateway that shut down cleanly ends "killed by SIGTERM" (-15), which is
    what was asked, not a failure."""
    if code in (0, -signal.SIGTERM):
        return "stopped cleanly"
    if code is not None and code < 0:
        return f"stopped by signal {signal.Signals(-code).name}"
    return f"stopped (exit code {code})"


class _Child(asyncio.SubprocessProtocol):
    """Turns a child's output into whole lines and tells when it exits."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._pending = b""
        # Exit and end-of-output are separate: a grandchild may hold the pipe after the exit.
        self.exited = asyncio.Event()
        self.closed = asyncio.Event()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        """Emit every complete line; keep the tail for the next read."""
        *lines, self._pending = (self._pending + data).split(b"\n")
        for line in lines:
            self._emit(line.decode(errors="replace").rstrip("\r"))

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        """Emit a last line that had no newline."""
        if self._pending:
            self._emit(self._pending.decode(errors="replace"))
            self._pending = b""

    def process_exited(self) -> None:
        """Note the exit."""
        self.exited.set()

    def connection_lost(self, exc: Exception | None) -> None:
        """Note that the process has exited and its pipe is closed."""
        self.closed.set()


def _signal(pid: int, sig: signal.Signals, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _kill_group(pid: int) -> None:
    _signal(pid, signal.SIGKILL, group=True)


def run_supervisor(
    children: Sequence[ChildSpec],
    *,
    backoff: Backoff = Backoff(),
    # As `Supervisor`'s: longer than a stage's drain, or `sluice up` kills it mid-drain.
    stop_timeout_s: float = 35.0,
) -> int:
    """Run `sluice up` in the foreground until SIGINT/SIGTERM; returns the exit code."""

    async def main() -> int:
        supervisor = Supervisor(children, backoff=backoff, stop_timeout_s=stop_timeout_s)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, supervisor.stop)
        return await supervisor.run()

    return asyncio.run(main())
