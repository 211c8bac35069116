"""The gateway's webhook dispatcher against stand-ins for the job store and the broker: what
it publishes for each claimed webhook, and that only a confirmed publish is marked sent."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

from contracts import routing
from contracts.errors import Transient
from contracts.messages import Message, WebhookRequest
from gateway.http.schemas import Job, Progress, WebhookState
from gateway.http.services import Services
from gateway.http.webhook_dispatch import WebhookDispatcher


def _job(job_id: str, **extra: Any) -> Job:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    return Job(
        job_id=job_id,
        document_id=f"doc-{job_id}",
        collection="default",
        filename=f"{job_id}.md",
        content_type="text/markdown",
        size_bytes=10,
        blob_sha256="0" * 64,
        status="indexed",
        progress=Progress(chunks_total=1, chunks_embedded=1, chunks_indexed=1),
        stages={},
        created_at=now,
        updated_at=now,
        **extra,
    )


class FakeStore:
    """Hands out the webhooks it is given once, and records which were marked published."""

    def __init__(self, due: list[tuple[Job, str]]) -> None:
        self.due = due
        self.published: list[str] = []

    def claim_webhooks(self, lease_s: float, limit: int) -> list[tuple[Job, str]]:
        claimed, self.due = self.due[:limit], self.due[limit:]
        return claimed

    def webhook_published(self, job_id: str) -> None:
        self.published.append(job_id)


class FakeBroker:
    """Records publishes; refuses those of the jobs named in `refuse`."""

    publish_timeout_s = 10.0
    is_connected = True

    def __init__(self, refuse: set[str] | None = None) -> None:
        self.refuse = refuse or set()
        self.sent: list[tuple[Message, str | None]] = []

    async def publish(self, model: Message, routing_key: str | None = None) -> None:
        if model.job_id in self.refuse:
            raise Transient("the broker did not confirm")
        self.sent.append((model, routing_key))


def _dispatcher(store: FakeStore, broker: FakeBroker) -> WebhookDispatcher:
    services = SimpleNamespace(store=store, broker=broker)
    return WebhookDispatcher(cast(Services, services))


async def test_each_claimed_webhook_is_published_then_marked() -> None:
    bulk = _job("b", priority="bulk", webhook=WebhookState(status="pending", round=2))
    store = FakeStore([(_job("a"), "https://a.example/in"), (bulk, "https://b.example/in")])
    broker = FakeBroker()

    assert await _dispatcher(store, broker).once() == 2

    assert store.published == ["a", "b"]
    (first, key_a), (second, key_b) = broker.sent
    assert key_a == key_b == routing.WEBHOOK
    assert isinstance(first, WebhookRequest) and isinstance(second, WebhookRequest)
    assert (first.callback_url, first.delivery_id, first.priority) == (
        "https://a.example/in",
        "a.1",
        "interactive",
    )
    # A job retried and ended again is a new delivery; its lane is the job's.
    assert (second.delivery_id, second.priority) == ("b.2", "bulk")
    # The body is the job JSON as the API answers it.
    assert second.job == bulk.model_dump(mode="json")


async def test_an_unconfirmed_publish_is_left_for_a_later_round() -> None:
    store = FakeStore([(_job("a"), "https://a.example/in"), (_job("b"), "https://b.example/in")])
    broker = FakeBroker(refuse={"a"})

    assert await _dispatcher(store, broker).once() == 1

    assert store.published == ["b"]
    assert [m.job_id for m, _ in broker.sent] == ["b"]


async def test_nothing_is_claimed_while_the_broker_is_away() -> None:
    store = FakeStore([(_job("a"), "https://a.example/in")])
    broker = FakeBroker()
    broker.is_connected = False

    assert await _dispatcher(store, broker).once() == 0

    assert len(store.due) == 1 and store.published == []
