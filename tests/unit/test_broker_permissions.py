"""The RabbitMQ permissions of each role, derived from the pipeline: the README shows exactly
what contracts/broker_permissions.py derives, and each role's routing keys are its own.
(tests/integration/test_broker_permissions.py runs a pipeline under them on RabbitMQ.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from contracts import routing
from contracts.broker_permissions import GATEWAY, RolePermissions, rabbitmqctl_lines, roles
from contracts.pipeline import build, default_pipeline

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "### A RabbitMQ of its own: vhost, users and permissions"


def _publishes(role: RolePermissions, exchange: str, key: str) -> bool:
    (topic,) = [t for t in role.topics if t.exchange == exchange]
    return re.search(topic.write, key) is not None


def test_the_readme_grants_what_the_default_pipeline_needs() -> None:
    text = README.read_text()
    section = text[text.index(f"\n{SECTION}\n") + 1 :]
    section = section[: section.find("\n### ")]
    shown = [
        line.strip()
        for line in section.splitlines()
        if re.match(r"\s*rabbitmqctl set(_topic)?_permissions ", line)
    ]
    assert shown == rabbitmqctl_lines("sluice", "sluice", default_pipeline())


def test_every_role_may_declare_the_whole_topology() -> None:
    for role in roles("sluice", default_pipeline()):
        for name in ("sluice", "sluice.stage.parse.bulk", "sluice.retry.embed.10s"):
            assert re.search(role.configure, name) and re.search(role.read, name), name
        assert re.search(role.write, "amq.default") and re.search(role.write, "sluice.tracker")
        assert not re.search(role.read, "other.stage.parse")
        assert not re.search(role.configure, "sluicex")


@pytest.mark.parametrize(
    ("role", "allowed", "refused"),
    [
        (
            GATEWAY,
            ["doc.uploaded", "doc.uploaded.bulk", "notify.webhook", "doc.embedded.bulk"],
            ["job.parse.progress", "worker.parse", "doc.uploadedx", "xdoc.uploaded"],
        ),
        (
            "parse",
            # doc.uploaded: the page ranges of a scan, handed to its own workers.
            ["doc.parsed", "doc.parsed.bulk", "doc.uploaded", "job.parse.failed", "worker.parse"],
            ["doc.chunked", "job.chunk.progress", "worker.embed", "job.parse.x", "doc.uploadedx"],
        ),
        ("index", ["job.index.progress", "worker.index"], ["doc.embedded", "doc.uploaded"]),
        ("webhook", ["job.webhook.failed", "worker.webhook"], ["notify.webhook", "doc.parsed"]),
    ],
)
def test_each_role_publishes_only_its_own_routing_keys(
    role: str, allowed: list[str], refused: list[str]
) -> None:
    declared = {r.role: r for r in roles("sluice", default_pipeline())}[role]
    main = routing.exchange("sluice")
    assert [k for k in allowed if not _publishes(declared, main, k)] == []
    assert [k for k in refused if _publishes(declared, main, k)] == []


def test_only_stages_send_dead_letters() -> None:
    dead = routing.dead_letter_exchange("sluice")
    for role in roles("sluice", default_pipeline()):
        keys = ["doc.uploaded", "sluice.stage.parse", ""]
        sends = [_publishes(role, dead, key) for key in keys]
        assert sends == [role.role != GATEWAY] * len(keys), role.role


def test_the_routing_keys_follow_the_pipeline_and_the_namespace() -> None:
    enriched = {r.role: r for r in roles("sluice-scale", build("parse,chunk,enrich,embed,index"))}
    main = routing.exchange("sluice-scale")
    assert _publishes(enriched["chunk"], main, "doc.enrich")
    assert not _publishes(enriched["chunk"], main, "doc.chunked")
    assert _publishes(enriched["enrich"], main, "doc.chunked.bulk")
    assert _publishes(enriched[GATEWAY], main, "doc.enrich")
    assert re.search(enriched["parse"].read, "sluice-scale.tracker")
    assert not re.search(enriched["parse"].read, "sluice.tracker")
