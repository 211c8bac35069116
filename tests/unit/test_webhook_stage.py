"""The webhook stage's handler, called directly with an in-memory HTTP transport: what it
sends (signed body, headers, to the checked address), how each answer ends the delivery, and
the secret it signs with."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from contracts.callback_target import CallbackRefused
from contracts.errors import Permanent, SluiceError, Transient
from contracts.messages import WebhookRequest
from contracts.settings import Settings
from contracts.webhook_signature import sign, verify
from stages.builtin import webhook
from stages.kit.secret_file import kept_secret

SECRET = "test-secret"
JOB = {"job_id": "j1", "status": "indexed", "filename": "café.md", "webhook": None}


def _request(url: str = "http://127.0.0.1:9/hooks/a") -> WebhookRequest:
    return WebhookRequest(
        job_id="j1",
        document_id="d1",
        collection="default",
        filename="café.md",
        callback_url=url,
        job=JOB,
        delivery_id="j1.1",
    )


def _context(
    answer: Callable[[httpx.Request], httpx.Response], *, allow_private: bool = True
) -> tuple[webhook.WebhookContext, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request)

    client = webhook.make_client(5.0, httpx.MockTransport(handler))
    return webhook.WebhookContext(client, SECRET, allow_private, 5.0), seen


async def test_the_job_is_posted_signed_with_its_delivery_and_job_ids() -> None:
    ctx, seen = _context(lambda r: httpx.Response(204))

    assert await webhook.handle(_request(), ctx) == []

    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == "http://127.0.0.1:9/hooks/a"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-sluice-delivery"] == "j1.1"
    assert request.headers["x-sluice-job-id"] == "j1"
    body = request.content
    assert json.loads(body) == JOB
    # The receiver's check, with the one definition receivers are given.
    assert request.headers["x-sluice-signature"] == sign(SECRET, body)
    assert verify(SECRET, body, request.headers["x-sluice-signature"])
    assert not verify(SECRET, body + b" ", request.headers["x-sluice-signature"])
    assert not verify("another-secret", body, request.headers["x-sluice-signature"])


async def test_a_name_is_resolved_and_the_checked_address_is_the_one_called() -> None:
    ctx, seen = _context(lambda r: httpx.Response(200))

    await webhook.handle(_request("https://localhost:8443/in?x=1"), ctx)

    (request,) = seen
    # The connection goes to the address that passed the check; name and TLS stay the name's.
    assert request.url.host in ("127.0.0.1", "::1")
    assert (request.url.port, request.url.path, request.url.query) == (8443, "/in", b"x=1")
    assert request.headers["host"] == "localhost:8443"
    assert request.extensions["sni_hostname"] == "localhost"


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9/in", "http://localhost/in", "http://[::1]/in", "http://10.0.0.1/in"],
)
async def test_a_private_target_is_refused_at_send_time_without_a_request(url: str) -> None:
    ctx, seen = _context(lambda r: httpx.Response(200), allow_private=False)

    with pytest.raises(CallbackRefused) as refused:
        await webhook.handle(_request(url), ctx)

    assert isinstance(refused.value, Permanent)
    assert seen == []


async def test_a_public_address_is_called_without_the_setting() -> None:
    ctx, seen = _context(lambda r: httpx.Response(200), allow_private=False)
    await webhook.handle(_request("http://93.184.215.14/in"), ctx)
    assert [str(r.url) for r in seen] == ["http://93.184.215.14/in"]


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
async def test_2xx_is_delivered(status: int) -> None:
    ctx, _ = _context(lambda r: httpx.Response(status))
    assert await webhook.handle(_request(), ctx) == []


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_busy_or_broken_receivers_are_retried(status: int) -> None:
    ctx, _ = _context(lambda r: httpx.Response(status, text="  come back\n later  "))

    with pytest.raises(Transient) as retried:
        await webhook.handle(_request(), ctx)

    assert retried.value.code == "webhook_unavailable"
    assert f"answered {status}: come back later" in retried.value.message


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "webhook_rejected"),
        (401, "webhook_rejected"),
        (404, "webhook_rejected"),
        (410, "webhook_rejected"),
        (422, "webhook_rejected"),
        (301, "webhook_redirected"),
        (307, "webhook_redirected"),
    ],
)
async def test_refusals_and_redirects_are_permanent_and_never_followed(
    status: int, code: str
) -> None:
    ctx, seen = _context(
        lambda r: httpx.Response(status, headers={"location": "http://127.0.0.1:9/elsewhere"})
    )

    with pytest.raises(Permanent) as refused:
        await webhook.handle(_request(), ctx)

    assert refused.value.code == code
    assert len(seen) == 1, "a redirect must not be followed"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (httpx.ConnectError("connection refused"), "webhook_unreachable"),
        (httpx.ReadError("connection reset"), "webhook_unreachable"),
        (httpx.RemoteProtocolError("server disconnected"), "webhook_unreachable"),
        (httpx.ConnectTimeout("timed out"), "webhook_timeout"),
        (httpx.ReadTimeout("timed out"), "webhook_timeout"),
    ],
)
async def test_timeouts_and_connection_errors_are_retried(
    error: httpx.TransportError, code: str
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise error

    ctx, _ = _context(fail)
    with pytest.raises(Transient) as retried:
        await webhook.handle(_request(), ctx)
    assert retried.value.code == code


async def test_a_huge_answer_is_read_only_as_far_as_the_error_needs() -> None:
    ctx, _ = _context(lambda r: httpx.Response(500, content=b"x" * 5_000_000))
    with pytest.raises(Transient) as retried:
        await webhook.handle(_request(), ctx)
    assert len(retried.value.message) < 400


# --- the secret -----------------------------------------------------------------------------


def test_the_configured_secret_wins(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, webhook_secret="from-the-environment")
    assert webhook.secret_of(settings) == "from-the-environment"
    assert not (tmp_path / webhook.SECRET_FILE).exists()


def test_without_one_a_secret_is_made_once_private_and_reused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first = webhook.secret_of(settings)
    path = tmp_path / "data" / webhook.SECRET_FILE
    assert len(first) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert webhook.secret_of(settings) == first
    # Nothing but the secret is left in the directory.
    assert [p.name for p in path.parent.iterdir()] == [webhook.SECRET_FILE]


async def test_processes_starting_at_once_agree_on_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "webhook.secret"
    made = await asyncio.gather(
        *(asyncio.to_thread(kept_secret, path, setting="X") for _ in range(16))
    )
    assert len(set(made)) == 1
    assert path.read_text().strip() == made[0]


def test_an_emptied_secret_file_is_an_error_naming_the_way_out(tmp_path: Path) -> None:
    path = tmp_path / "webhook.secret"
    path.write_text("\n")
    with pytest.raises(SluiceError, match="SLUICE_WEBHOOK_SECRET"):
        kept_secret(path, setting="SLUICE_WEBHOOK_SECRET")
