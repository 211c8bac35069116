"""`sluice ingest`: upload files and folders, follow every job to the end, summarise."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.table import Column
from rich.text import Text

from contracts.errors import SluiceError
from gateway.cli.client import TERMINAL_STATUSES, ApiError, GatewayUnreachable, Job, SluiceClient

_COLLECTION = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_UPLOAD_TRIES = 6
_MAX_RETRY_WAIT_S = 60.0
# Following is cheap (one idle connection per job) but not free for the gateway.
_MAX_FOLLOWING = 64
_STATUS_STYLE = {"indexed": "green", "failed": "bold red", "waiting": "magenta"}


class UsageError(SluiceError):
    """The command line asks for something impossible (exit code 2)."""

    code = "usage_error"


@dataclass
class FileRow:
    """One file's journey: what the live display and the summary show."""

    path: Path
    name: str
    status: str = "pending"
    job_id: str | None = None
    duplicate: bool = False
    chunks_total: int | None = None
    chunks_indexed: int = 0
    error_stage: str | None = None
    error_code: str | None = None
    error_message: str | None = None

    def apply(self, job: Job) -> None:
        """Take the status, progress and error from a job body."""
        self.job_id = job.get("job_id", self.job_id)
        self.status = str(job.get("status", self.status))
        progress = job.get("progress") or {}
        self.chunks_total = progress.get("chunks_total", self.chunks_total)
        self.chunks_indexed = progress.get("chunks_indexed", self.chunks_indexed) or 0
        error = job.get("error")
        if isinstance(error, dict):
            self.error_stage = error.get("stage")
            self.error_code = error.get("code")
            self.error_message = error.get("message")
        elif self.status == "failed":
            self.error_code = self.error_code or "unknown"

    def fail(self, code: str, message: str, stage: str | None = None) -> None:
        """Mark the file failed before or outside the pipeline."""
        self.status, self.error_code, self.error_message = "failed", code, message
        self.error_stage = stage

    def failure_line(self) -> str:
        """`name: [stage] code: message` on one line."""
        message = " ".join((self.error_message or "").split())
        return f"{self.name}: [{self.error_stage or 'upload'}] {self.error_code}: {message}"


def expand_paths(paths: Sequence[Path]) -> list[FileRow]:
    """Files named directly plus every non-hidden file under the folders named, in order."""
    rows: list[FileRow] = []
    seen: set[Path] = set()
    for given in paths:
        if not given.exists():
            raise UsageError(f"path does not exist: {given}")
        if given.is_dir():
            found = sorted(
                (path, path.relative_to(given).as_posix())
                for path in given.rglob("*")
                if path.is_file()
                and not any(part.startswith(".") for part in path.relative_to(given).parts)
            )
        else:
            found = [(given, given.name)]
        for path, name in found:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                rows.append(FileRow(path=path, name=name))
    if not rows:
        raise UsageError("no files found in " + ", ".join(str(p) for p in paths))
    return rows


class _BarOnceKnown(ProgressColumn):
    """A chunk bar that stays blank until the job knows how many chunks it has."""

    def __init__(self) -> None:
        super().__init__()
        self._bar = BarColumn(bar_width=30, complete_style="cyan", finished_style="green")

    def render(self, task: Task) -> RenderableType:
        """The bar, or nothing yet."""
        return Text("") if task.total is None else self._bar.render(task)


class _Display:
    """A live table of rows on a terminal; one plain line per finished file otherwise."""

    def __init__(self, rows: list[FileRow], console: Console) -> None:
        self._console = console
        self._live = console.is_terminal
        name_width = min(max(len(row.name) for row in rows), 48)
        self._progress = Progress(
            TextColumn(
                "{task.description}",
                markup=False,
                table_column=Column(width=name_width, no_wrap=True, overflow="ellipsis"),
            ),
            TextColumn("{task.fields[status]}", table_column=Column(width=34, no_wrap=True)),
            _BarOnceKnown(),
            TextColumn("{task.fields[chunks]}"),
            console=console,
            refresh_per_second=8,
        )
        self._tasks: dict[int, TaskID] = {}
        for row in rows:
            self._tasks[id(row)] = self._progress.add_task(
                row.name, total=None, status=self._status(row), chunks=""
            )

    def __enter__(self) -> Self:
        if self._live:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live:
            self._progress.stop()

    @staticmethod
    def _status(row: FileRow) -> str:
        style = _STATUS_STYLE.get(row.status.split()[0], "cyan")
        label = row.status + (" (duplicate)" if row.duplicate else "")
        if row.status == "failed" and row.error_code:
            label = f"failed: {row.error_code}"
        return f"[{style}]{label}[/]"

    def update(self, row: FileRow) -> None:
        """Show the row's new state."""
        if self._live:
            chunks = "" if row.chunks_total is None else f"{row.chunks_indexed}/{row.chunks_total}"
            self._progress.update(
                self._tasks[id(row)],
                status=self._status(row),
                chunks=chunks,
                total=row.chunks_total,
                completed=row.chunks_indexed,
            )
        elif row.status in TERMINAL_STATUSES:
            print(self._plain_line(row), flush=True)

    @staticmethod
    def _plain_line(row: FileRow) -> str:
        if row.status == "failed":
            return "failed   " + row.failure_line()
        detail = f"{row.chunks_total} chunks" if row.chunks_total is not None else ""
        if row.duplicate:
            detail = ", ".join(part for part in (detail, "duplicate") if part)
        return f"indexed  {row.name}" + (f" ({detail})" if detail else "")


async def _upload(
    client: SluiceClient, row: FileRow, collection: str, priority: str, display: _Display
) -> Job | None:
    """Upload with bounded retries on 429/503 and on a gateway that is briefly away."""
    for attempt in range(1, _UPLOAD_TRIES + 1):
        row.status = "uploading"
        display.update(row)
        try:
            return await client.upload(row.path, collection, priority=priority)
        except ApiError as exc:
            if exc.status == 401:
                raise
            if exc.status not in (429, 503) or attempt == _UPLOAD_TRIES:
                row.fail(exc.code, exc.message)
                return None
            wait_s = exc.retry_after if exc.retry_after is not None else 2.0**attempt
            row.status = f"waiting ({exc.code})"
            display.update(row)
            await asyncio.sleep(min(wait_s, _MAX_RETRY_WAIT_S))
        except GatewayUnreachable:
            if attempt == _UPLOAD_TRIES:
                raise
            await asyncio.sleep(2.0 ** (attempt - 1))
        except SluiceError as exc:
            row.fail(exc.code, exc.message)
            return None
        except OSError as exc:
            row.fail("unreadable_file", f"{row.path}: {exc.strerror or exc}")
            return None
    return None


async def _ingest_all(
    client: SluiceClient,
    rows: list[FileRow],
    collection: str,
    priority: str,
    concurrency: int,
    display: _Display,
) -> None:
    upload_slots = asyncio.Semaphore(concurrency)
    follow_slots = asyncio.Semaphore(_MAX_FOLLOWING)

    async def one(row: FileRow) -> None:
        async with upload_slots:
            accepted = await _upload(client, row, collection, priority, display)
        if accepted is None:
            display.update(row)
            return
        row.duplicate = accepted.get("duplicate") is True
        row.apply(accepted)
        display.update(row)
        async with follow_slots:
            try:
                async for job in client.follow(str(accepted["job_id"])):
                    row.apply(job)
                    display.update(row)
            except ApiError as exc:
                if exc.status == 401:
                    raise
                row.fail(exc.code, exc.message)
                display.update(row)

    try:
        async with asyncio.TaskGroup() as group:
            for row in rows:
                group.create_task(one(row))
    except BaseExceptionGroup as failures:
        raise _first_leaf(failures) from None


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def summary_lines(rows: list[FileRow]) -> list[str]:
    """`N indexed, M failed[, K duplicates (already indexed)]`, then one line per failure.

    A duplicate did no new work, so it is counted apart, never among the indexed."""
    duplicates = sum(row.duplicate and row.status == "indexed" for row in rows)
    indexed = sum(row.status == "indexed" and not row.duplicate for row in rows)
    failed = [row for row in rows if row.status != "indexed"]
    head = f"{indexed} indexed, {len(failed)} failed"
    if duplicates:
        head += f", {duplicates} duplicate{'s' if duplicates != 1 else ''} (already indexed)"
    return [head, *("  " + row.failure_line() for row in failed)]


async def _run(
    rows: list[FileRow],
    url: str,
    api_key: str | None,
    collection: str,
    priority: str,
    concurrency: int,
) -> None:
    async with SluiceClient(url, api_key) as client:
        # Checked up front so a missing gateway is one clear line, not a failure per file.
        await client.ping()
        with _Display(rows, Console()) as display:
            await _ingest_all(client, rows, collection, priority, concurrency, display)


def default_priority(paths: Sequence[Path]) -> str:
    """`bulk` when a folder is named (an import: nobody waits on each file), else
    `interactive` (someone is waiting for the file they named)."""
    return "bulk" if any(path.is_dir() for path in paths) else "interactive"


def run_ingest(
    paths: Sequence[Path],
    *,
    url: str,
    api_key: str | None,
    collection: str = "default",
    concurrency: int = 4,
    priority: str | None = None,
) -> int:
    """Run `sluice ingest`; returns the exit code (0 all indexed, 1 any failed)."""
    priority = priority or default_priority(paths)
    if priority not in ("interactive", "bulk"):
        raise UsageError(f"invalid priority {priority!r}: use interactive or bulk")
    if not _COLLECTION.fullmatch(collection):
        raise UsageError(f"invalid collection {collection!r}: use [a-z0-9][a-z0-9_-]{{0,62}}")
    if concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    rows = expand_paths(paths)
    try:
        asyncio.run(_run(rows, url, api_key, collection, priority, concurrency))
    except KeyboardInterrupt:
        print("interrupted; accepted jobs go on — see `sluice jobs`", file=sys.stderr)
        return 130
    for row in rows:
        if row.status not in TERMINAL_STATUSES:
            row.fail("not_finished", "the job did not reach a final status")
    print("\n".join(summary_lines(rows)), flush=True)
    return 0 if all(row.status == "indexed" for row in rows) else 1
