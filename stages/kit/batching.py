"""Coalescing: items submitted by concurrently handled messages go into one call.

On a CPU the model call dominates, and one call over many chunks is cheaper than many small
calls; on a GPU a full batch is the difference between idle and busy. A stage's handlers each
`await coalescer.submit(items)`; the coalescer waits for company up to `max_wait_s` (so a lone
small document is not held long), or until `max_items` are in, then makes one call in a
thread and hands every caller its own slice of the results. Each message is still acked by
the runtime only after its own outputs are confirmed.

An `urgent` submission (interactive work) goes ahead of every non-urgent one still pending,
first come first served within each, into a call of urgent items only: its answer never
waits for a full call of bulk items. A big call can be cut into slices (`slice_items`,
after ordering its items by `size_of`, so each slice is of similar lengths and pads little,
as one big sorted call would): before each slice, urgent work that arrived meanwhile runs
first. So interactive work waits for at most one slice of a bulk import, never for a whole
call of hundreds of chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Link

from stages.infra import tracing

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Request(Generic[T, R]):
    items: Sequence[T]
    done: asyncio.Future[list[R]]
    link: Link | None = field(default=None)


class Coalescer(Generic[T, R]):
    """Gathers concurrent submissions into calls of up to `max_items` (a bigger one goes alone)."""

    def __init__(
        self,
        call: Callable[[list[T]], list[R]],
        *,
        max_items: int,
        max_wait_s: float,
        name: str,
        slice_items: int | None = None,
        size_of: Callable[[T], int] | None = None,
    ) -> None:
        self._call = call
        self.max_items = max_items
        self.max_wait_s = max_wait_s
        self.name = name
        self.slice_items = slice_items
        self._size_of = size_of
        # Calls run one at a time, always on the same thread: a model's thread pool (OpenMP)
        # is per calling thread, and a new caller would warm up a new one.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-calls")
        # Urgent submissions, then the others: the next call takes from the front.
        self._urgent: deque[_Request[T, R]] = deque()
        self._others: deque[_Request[T, R]] = deque()
        self._full = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, items: Sequence[T], *, urgent: bool = False) -> list[R]:
        """The results for `items`, computed in a call shared with other submissions; an
        `urgent` one goes into the next call ahead of every non-urgent one pending."""
        context = trace.get_current_span().get_span_context()
        request: _Request[T, R] = _Request(
            items,
            asyncio.get_running_loop().create_future(),
            Link(context) if context.is_valid else None,
        )
        (self._urgent if urgent else self._others).append(request)
        if self._pending_items() >= self.max_items:
            self._full.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())
        return await request.done

    def _pending(self) -> Iterator[_Request[T, R]]:
        yield from self._urgent
        yield from self._others

    def _pending_items(self) -> int:
        return sum(len(r.items) for r in self._pending())

    def _next_batch(self) -> list[_Request[T, R]]:
        """Pending requests from the front, up to `max_items` (a bigger first one alone):
        urgent ones only while there are any, so their call is as short as it can be."""
        queue = self._urgent or self._others
        batch: list[_Request[T, R]] = []
        size = 0
        # In order: when the next in line does not fit, nobody behind it jumps the queue.
        while queue and (not batch or size + len(queue[0].items) <= self.max_items):
            request = queue.popleft()
            batch.append(request)
            size += len(request.items)
        return batch

    async def _flush_soon(self) -> None:
        while self._urgent or self._others:
            # Wait for company, unless a full batch gathered already (during the last call).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.max_wait_s)
            self._full.clear()
            batch = self._next_batch()
            if self._pending_items() >= self.max_items:
                self._full.set()
            # One call at a time (this loop): the model already uses every core it has.
            await self._run(batch)

    async def _run(self, batch: list[_Request[T, R]]) -> None:
        links = [r.link for r in batch if r.link is not None]
        items = [item for request in batch for item in request.items]
        with tracing.tracer.start_as_current_span(
            f"{self.name} batch",
            links=links,
            attributes={"sluice.batch_size": len(items), "sluice.messages": len(batch)},
        ) as span:
            try:
                results = await self._call_in_slices(items)
            except Exception as exc:
                tracing.record_failure(span, exc)
                if len(batch) == 1:
                    batch[0].done.set_exception(exc)
                    return
                # Whose items failed? Run each alone so the error lands on its own message.
                for request in batch:
                    await self._run([request])
                return
        start = 0
        for request in batch:
            end = start + len(request.items)
            if not request.done.done():
                request.done.set_result(results[start:end])
            start = end

    async def _in_thread(self, items: list[T]) -> list[R]:
        """One call, on the coalescer's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._call, items)

    async def _call_in_slices(self, items: list[T]) -> list[R]:
        """The call's results for `items`, in order: in one call, or in slices of similar
        sizes with urgent work let in between them (for a call of non-urgent items)."""
        cut = self.slice_items
        if not cut or len(items) <= cut:
            return await self._in_thread(items)
        size_of = self._size_of or (lambda _: 0)
        order = sorted(range(len(items)), key=lambda i: size_of(items[i]), reverse=True)
        results: dict[int, R] = {}
        for first in range(0, len(order), cut):
            while self._urgent:
                # Interactive work that came in during the last slice goes before the next.
                await self._run(self._next_batch())
            chosen = order[first : first + cut]
            answered = await self._in_thread([items[i] for i in chosen])
            results.update(zip(chosen, answered, strict=True))
        return [results[i] for i in range(len(items))]
