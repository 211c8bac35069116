"""Sluice on a RabbitMQ cluster, without one: the broker list in `SLUICE_AMQP_URL`, passwords
kept out of messages, the replicated topology (and the unchanged one on one node), and an
upload refused by a queue between leaders answered 503, not 429."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, cast

import pytest

from contracts import routing
from contracts.broker_urls import redacted, split_urls
from contracts.settings import Settings
from contracts.topology import DEAD_LETTER_SCANS, topology
from gateway.http.errors import ApiError
from gateway.http.services import Services
from gateway.http.uploads import publish_upload
from gateway.store.base import Admission, NewJob
from gateway.store.job_store import SqliteJobStore
from stages.backends.factory import open_blob_store
from stages.infra.broker import PublishRejected, QueueUnavailable
from stages.infra.queue_room import length_limited_targets
from stages.runtime.memory_broker import MemoryBroker

THREE = "amqp://sluice:s3cret@node1:5672/, amqp://sluice:s3cret@node2:5672/,amqp://sluice:s3cret@node3:5672/"


def test_one_url_is_a_list_of_one() -> None:
    assert Settings().amqp_urls == ("amqp://guest:guest@localhost:5672/",)


def test_several_brokers_are_read_in_order() -> None:
    settings = Settings(amqp_url=THREE, quorum_initial_group_size=3)
    assert [u.split("@")[1] for u in settings.amqp_urls] == [
        "node1:5672/",
        "node2:5672/",
        "node3:5672/",
    ]


def test_several_brokers_replicate_every_queue_on_three_unless_told() -> None:
    assert Settings(amqp_url=THREE).quorum_initial_group_size == 3
    assert Settings(amqp_url=THREE, quorum_initial_group_size=2).quorum_initial_group_size == 2
    assert Settings().quorum_initial_group_size is None


def test_a_bad_entry_is_named_without_its_password() -> None:
    with pytest.raises(ValueError) as raised:
        split_urls("amqp://sluice:s3cret@node1:5672/,http://sluice:s3cret@node2/")
    assert "http://sluice:***@node2/" in str(raised.value)
    assert "s3cret" not in str(raised.value)
    with pytest.raises(ValueError, match="empty"):
        split_urls(" , ")


def test_redacted_hides_only_the_password() -> None:
    assert (
        redacted("amqps://sluice:s3cret@rabbit:5671/prod") == "amqps://sluice:***@rabbit:5671/prod"
    )
    assert redacted("amqp://rabbit/") == "amqp://rabbit/"
    assert redacted("amqp://u:p@host:notaport/") == "amqp://u:***@host:notaport/"


def _arguments(settings: Settings) -> dict[str, dict[str, str | int]]:
    return {q.name: q.arguments.as_amqp() for q in topology(settings).queues}


def test_one_node_declares_what_it_always_did(tmp_path: Path) -> None:
    """Existing queues must redeclare: RabbitMQ refuses a queue back with other arguments,
    `x-quorum-initial-group-size` included (checked on 3.10.8)."""
    queues = _arguments(Settings(data_dir=tmp_path))
    ns = "sluice"
    assert all("x-quorum-initial-group-size" not in a for a in queues.values())
    assert all("x-dead-letter-strategy" not in a for a in queues.values())
    assert "x-queue-type" not in queues[routing.retry_queue(ns, "embed", 1)]
    assert queues[routing.dead_letter_queue(ns)] == {"x-queue-type": "classic"}
    assert queues[routing.tracker_queue(ns)] == {"x-queue-type": "quorum"}


def test_a_cluster_replicates_every_queue(tmp_path: Path) -> None:
    queues = _arguments(Settings(data_dir=tmp_path, quorum_initial_group_size=3))
    ns = "sluice"
    for name, arguments in queues.items():
        assert arguments["x-queue-type"] == "quorum", name
        assert arguments["x-quorum-initial-group-size"] == 3, name
        if "x-dead-letter-exchange" in arguments:
            # A dead letter or a retried message is never dropped while a node is lost.
            assert arguments["x-dead-letter-strategy"] == "at-least-once", name
            assert arguments["x-overflow"] == "reject-publish", name
    retry = queues[routing.retry_queue(ns, "embed", 1)]
    assert retry["x-message-ttl"] == 1000
    assert retry["x-dead-letter-routing-key"] == routing.stage_queue(ns, "embed")
    assert queues[routing.dead_letter_queue(ns)]["x-delivery-limit"] == DEAD_LETTER_SCANS


def test_only_length_limited_queues_can_be_full(tmp_path: Path) -> None:
    topo = topology(Settings(data_dir=tmp_path))
    parse = routing.stage_queue("sluice", "parse")
    by_key = length_limited_targets(topo, "sluice", routing.DOC_UPLOADED)
    assert [q.name for q in by_key] == [parse]
    bulk = length_limited_targets(topo, "sluice", routing.lane_key(routing.DOC_UPLOADED, "bulk"))
    assert [q.name for q in bulk] == [routing.stage_queue("sluice", "parse", "bulk")]
    assert [q.name for q in length_limited_targets(topo, "", parse)] == [parse]
    assert length_limited_targets(topo, "", routing.retry_queue("sluice", "parse", 1)) == []
    assert length_limited_targets(topo, "sluice", "job.parse.done") == []


def test_a_queue_between_leaders_is_backpressure_to_a_stage() -> None:
    """A stage's output refused by a queue without a leader waits in a retry tier without
    spending an attempt, as it would for a full queue."""
    assert issubclass(QueueUnavailable, PublishRejected)
    assert QueueUnavailable("x").code == "broker_unavailable"


class _Broker(MemoryBroker):
    is_connected = True
    publish_timeout_s = 5.0


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (QueueUnavailable("no leader"), 503, "broker_unavailable"),
        (PublishRejected("full"), 429, "pipeline_saturated"),
    ],
)
async def test_an_upload_refused_by_a_queue_between_leaders_is_a_503(
    tmp_path: Path, error: Exception, status: int, code: str
) -> None:
    settings = Settings(data_dir=tmp_path)
    broker = _Broker(settings)
    broker.fail(routing.DOC_UPLOADED, error)
    services = Services(
        settings=settings,
        store=SqliteJobStore(settings.job_db_path, admission=Admission.of(settings)),
        blobs=open_blob_store(settings),
        index=cast(Any, None),
        broker=cast(Any, broker),
    )
    job = NewJob(
        "j1", "d1", "default", "a.md", "text/markdown", 1, hashlib.sha256(b"a").hexdigest()
    )
    with pytest.raises(ApiError) as raised:
        await publish_upload(services, job)
    assert (raised.value.status, raised.value.code) == (status, code)
