"""Lanes below the runner: who gets a worker slot, who rides the next model call, and which
lane a dead letter goes back to. No broker: the gate and the coalescer are plain asyncio."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

import pytest

from contracts.messages import Chunk, ChunkBatch
from contracts.routing import BULK, INTERACTIVE, Lane
from stages.builtin import embed
from stages.infra.dead_letter_queue import lane_of
from stages.kit.batching import Coalescer
from stages.runtime.lanes import LaneGate

INT, BLK = INTERACTIVE, BULK


async def until(condition: Callable[[], bool], *, turns: int = 1000) -> None:
    """Let other tasks run until `condition` holds (a bounded number of loop turns)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def grant_order(gate: LaneGate, arrivals: Sequence[Lane]) -> list[Lane]:
    """The lanes in the order the gate grants them, every slot taken when they arrive."""
    held = [asyncio.create_task(gate.acquire(INT)) for _ in range(gate.slots)]
    await asyncio.gather(*held)
    order: list[Lane] = []

    async def wants(lane: Lane) -> None:
        async with gate.slot(lane):
            order.append(lane)

    waiters: list[asyncio.Task[None]] = []

    def all_wait() -> bool:
        return gate.waiting(INT) + gate.waiting(BLK) == len(waiters)

    for lane in arrivals:
        waiters.append(asyncio.create_task(wants(lane)))
        # One at a time, so the arrival order is the order given.
        await until(all_wait)
    for _ in held:
        gate.release(INT)
    await asyncio.gather(*waiters)
    assert gate.busy == 0
    return order


async def test_a_free_slot_goes_to_interactive_first() -> None:
    gate = LaneGate(1, bulk_share=0.2)
    order = await grant_order(gate, [BLK, BLK, BLK, INT, INT])
    # Two contested grants earn bulk 0.4 of a credit: interactive takes both, bulk the rest.
    assert order == [INT, INT, BLK, BLK, BLK]


@pytest.mark.parametrize(
    ("share", "pattern"),
    [(0.2, [INT, INT, INT, INT, BLK]), (0.25, [INT, INT, INT, BLK]), (0.5, [INT, BLK])],
)
async def test_bulk_gets_its_share_while_both_lanes_wait(share: float, pattern: list[Lane]) -> None:
    gate = LaneGate(1, bulk_share=share)
    rounds = 4
    arrivals = [BLK] * rounds + [INT] * (len(pattern) - 1) * rounds
    order = await grant_order(gate, arrivals)
    # Exactly its share, at regular places: a counter, not a coin.
    assert order == pattern * rounds


async def test_bulk_is_never_starved_by_a_stream_of_interactive_work() -> None:
    gate = LaneGate(2, bulk_share=0.2)
    order = await grant_order(gate, [BLK] * 3 + [INT] * 30)
    assert order.count(BLK) == 3
    # All three bulk deliveries were served while interactive work still waited.
    assert max(i for i, lane in enumerate(order) if lane == BLK) < len(order) - 10


async def test_reserved_slots_keep_room_for_interactive_work_to_begin() -> None:
    # A stage whose slots wait on a shared call: a bulk import must not hold every one.
    gate = LaneGate(4, bulk_share=0.2, reserved=1)
    bulk = [asyncio.create_task(gate.acquire(BLK)) for _ in range(4)]
    await until(lambda: gate.waiting(BLK) == 1)
    assert gate.busy == 3  # the fourth bulk delivery waits though a slot is free
    await asyncio.wait_for(gate.acquire(INT), 1)  # interactive begins at once
    assert gate.busy == 4 and gate.waiting(BLK) == 1
    gate.release(INT)
    assert gate.busy == 3 and gate.waiting(BLK) == 1  # the freed slot stays in reserve
    gate.release(BLK)
    await asyncio.gather(*bulk)  # a bulk slot freed: the waiting bulk delivery takes it
    assert gate.busy == 3 and gate.waiting(BLK) == 0


async def test_lanes_off_is_first_come_first_served() -> None:
    arrivals = [BLK, INT, BLK, BLK, INT, INT, BLK]
    assert await grant_order(LaneGate(1, bulk_share=0.2, prefer_interactive=False), arrivals) == (
        arrivals
    )


async def test_a_cancelled_waiter_gives_its_turn_away() -> None:
    gate = LaneGate(1, bulk_share=0.2)
    await gate.acquire(INT)
    gone = asyncio.create_task(gate.acquire(INT))
    stays = asyncio.create_task(gate.acquire(BLK))
    await until(lambda: gate.waiting(INT) == 1 and gate.waiting(BLK) == 1)
    gone.cancel()
    gate.release(INT)
    await stays
    assert gone.cancelled() and gate.busy == 1 and gate.waiting(INT) == 0


class Recorder:
    """A model call that remembers each batch of items it was given."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, items: list[str]) -> list[str]:
        self.calls.append(items)
        return [item.upper() for item in items]


@pytest.mark.parametrize("urgent", [False, True])
async def test_urgent_items_go_into_the_next_call_first(urgent: bool) -> None:
    call = Recorder()
    coalescer = Coalescer(call, max_items=4, max_wait_s=5.0, name="test")
    bulk = [coalescer.submit([f"b{n}", f"b{n}"]) for n in range(3)]
    late = coalescer.submit(["i0", "i0"], urgent=urgent)
    results = await asyncio.gather(*bulk, late)
    assert results[-1] == ["I0", "I0"]
    if urgent:
        # A call of its own: its answer does not wait for bulk items to be embedded too.
        assert call.calls == [["i0", "i0"], ["b0", "b0", "b1", "b1"], ["b2", "b2"]]
    else:
        assert call.calls == [["b0", "b0", "b1", "b1"], ["b2", "b2", "i0", "i0"]]


async def test_urgent_items_keep_their_own_order() -> None:
    call = Recorder()
    coalescer = Coalescer(call, max_items=2, max_wait_s=5.0, name="test")
    await asyncio.gather(
        coalescer.submit(["b0"]),
        coalescer.submit(["i0"], urgent=True),
        coalescer.submit(["b1"]),
        coalescer.submit(["i1"], urgent=True),
    )
    assert call.calls == [["i0", "i1"], ["b0", "b1"]]


class HeldFirstCall(Recorder):
    """A model call whose first run waits until the test lets it finish."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def __call__(self, items: list[str]) -> list[str]:
        self.calls.append(items)
        if len(self.calls) == 1:
            assert self.release.wait(10), "the test never released the first call"
        return [item.upper() for item in items]


async def test_urgent_work_runs_between_the_slices_of_a_big_call() -> None:
    call = HeldFirstCall()
    coalescer = Coalescer(
        call, max_items=100, max_wait_s=0.0, name="test", slice_items=2, size_of=len
    )
    texts = ["aaaaaa", "b", "cccc", "dd", "eeeee", "fff"]
    bulk = asyncio.ensure_future(coalescer.submit(texts))
    for _ in range(1000):
        if call.calls:
            break
        await asyncio.sleep(0.005)
    # The first slice is in the model; interactive work arrives now.
    urgent = asyncio.ensure_future(coalescer.submit(["u"], urgent=True))
    await asyncio.sleep(0)
    call.release.set()

    assert await urgent == ["U"]
    assert await bulk == [t.upper() for t in texts]
    # Slices of similar lengths, longest first, with the interactive call after the first.
    assert call.calls == [["aaaaaa", "eeeee"], ["u"], ["cccc", "fff"], ["dd", "b"]]


class FakeEmbedder:
    """Records what each model call embedded; every vector is the same."""

    dimensions = 2

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text."""
        self.calls.append(list(texts))
        return [[1.0, 0.0] for _ in texts]


def _batch(job: str, priority: Lane) -> ChunkBatch:
    return ChunkBatch(
        job_id=job,
        document_id=job,
        collection="default",
        filename=f"{job}.txt",
        priority=priority,
        batch_index=0,
        batch_count=1,
        chunks_total=1,
        chunks=[Chunk(chunk_id=job, chunk_index=0, text=job)],
    )


@pytest.mark.parametrize("lanes", [True, False])
async def test_embed_puts_interactive_chunks_into_the_next_model_call(lanes: bool) -> None:
    embedder = FakeEmbedder()
    ctx = embed.context_for(embedder, max_items=2, max_wait_s=5.0, lanes=lanes)
    batches = [
        _batch("bulk0", BLK),
        _batch("bulk1", BLK),
        _batch("bulk2", BLK),
        _batch("inter", INT),
    ]
    outputs = await asyncio.gather(*(embed.handle(b, ctx) for b in batches))
    assert [out.priority for (out,) in outputs] == [BLK, BLK, BLK, INT]
    if lanes:
        assert embedder.calls == [["inter"], ["bulk0", "bulk1"], ["bulk2"]]
    else:
        assert embedder.calls == [["bulk0", "bulk1"], ["bulk2", "inter"]]


@pytest.mark.parametrize(
    ("body", "routing_key", "lane"),
    [
        (b'{"priority": "bulk"}', "doc.chunked", BLK),
        (b'{"priority": "interactive"}', "doc.chunked.bulk", INT),
        (b'{"job_id": "j"}', "doc.chunked.bulk", BLK),
        (b"not json", "t.stage.embed.bulk", BLK),
        (b'{"priority": "urgent!"}', "doc.chunked", INT),
        (b"[]", None, INT),
    ],
)
def test_a_dead_letter_goes_back_to_its_own_lane(
    body: bytes, routing_key: str | None, lane: Lane
) -> None:
    assert lane_of(body, routing_key) == lane
