"""Webhook: a finished job's JSON, POSTed signed to the `callback_url` its upload named.

A side stage (contracts/pipeline.py `WEBHOOK`): the runtime gives it lanes, retry tiers
(5 s to 30 min, about a day in all), dead letters and metrics like any stage. The target is
checked again here, at send time, by the same rules as at upload (contracts/callback_target.py:
a name may resolve elsewhere by now), and the request goes to the address that was checked.
Redirects are never followed: a redirect could lead anywhere the rules forbid.

How an answer ends the delivery: 2xx done; 408, 429, 5xx, a timeout or no connection
`Transient` (retried through the tiers); any other answer, or a refused target, `Permanent`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from dataclasses import dataclass

import httpx

from contracts import pipeline
from contracts.callback_target import CallbackTarget, check_addresses, parse_callback_url
from contracts.errors import Permanent, Transient
from contracts.messages import Message, WebhookRequest
from contracts.settings import Settings
from contracts.webhook_signature import DELIVERY_HEADER, JOB_HEADER, SIGNATURE_HEADER, sign
from stages.kit.secret_file import kept_secret
from stages.stage import Stage

log = logging.getLogger(__name__)

SECRET_FILE = "webhook.secret"
USER_AGENT = "sluice-webhook/1"
# Answers a receiver may give while it is overloaded or restarting: worth another try.
RETRYABLE_STATUSES = frozenset({408, 429})
# Of a receiver's answer, only this much is read (for the error a person sees).
_ANSWER_BYTES = 1024
_SHOWN_CHARS = 200


@dataclass(frozen=True)
class WebhookContext:
    """What the webhook stage needs: one HTTP client, the signing secret, the rules' setting."""

    client: httpx.AsyncClient
    secret: str
    allow_private: bool
    timeout_s: float


def make_client(
    timeout_s: float, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The client every delivery goes through: no redirects, no proxies from the environment
    (the checked address is the one connected to), `timeout_s` for each step."""
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=timeout_s,
        headers={"User-Agent": USER_AGENT},
        transport=transport,
    )


def secret_of(settings: Settings) -> str:
    """The signing secret: `SLUICE_WEBHOOK_SECRET`, else the one kept under the data dir."""
    if settings.webhook_secret:
        return settings.webhook_secret
    return kept_secret(settings.data_dir / SECRET_FILE, setting="SLUICE_WEBHOOK_SECRET")


async def startup(settings: Settings) -> WebhookContext:
    """Read (or make) the secret and open the HTTP client."""
    secret = await asyncio.to_thread(secret_of, settings)
    if not settings.webhook_secret and settings.job_store_url:
        # A shared job store means several machines; each would make a secret of its own.
        log.warning(
            "SLUICE_WEBHOOK_SECRET is not set: signing with the secret kept in %s, which "
            "webhook processes on other machines do not share; set it on every one of them",
            settings.data_dir / SECRET_FILE,
        )
    return WebhookContext(
        make_client(settings.webhook_timeout_s),
        secret,
        settings.webhook_allow_private,
        settings.webhook_timeout_s,
    )


async def shutdown(ctx: WebhookContext) -> None:
    """Close the HTTP client's connections."""
    await ctx.client.aclose()


def body_of(msg: WebhookRequest) -> bytes:
    """The exact bytes POSTed (and signed): the job JSON, compact, UTF-8."""
    return json.dumps(msg.job, separators=(",", ":"), ensure_ascii=False).encode()


async def handle(msg: WebhookRequest, ctx: WebhookContext) -> list[Message]:
    """POST the job to its callback URL, signed; raise what the runtime should do otherwise."""
    target = parse_callback_url(msg.callback_url)
    addresses = await _addresses(target, ctx.timeout_s)
    check_addresses(target, addresses, allow_private=ctx.allow_private)
    body = body_of(msg)
    headers = {
        "Content-Type": "application/json",
        "Host": target.host_header,
        SIGNATURE_HEADER: sign(ctx.secret, body),
        DELIVERY_HEADER: msg.delivery_id,
        JOB_HEADER: msg.job_id,
    }
    # TLS checks the certificate against the name, though the connection goes to an address.
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        # One deadline for the whole exchange: a receiver that drips bytes cannot hold a slot.
        async with asyncio.timeout(ctx.timeout_s):
            status, answer = await _post(ctx.client, target, addresses, body, headers, extensions)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise Transient(
            f"webhook for job {msg.job_id}: {target.host} did not answer within "
            f"{ctx.timeout_s:g} s; retrying later.",
            code="webhook_timeout",
        ) from exc
    except httpx.TransportError as exc:
        raise Transient(
            f"webhook for job {msg.job_id}: could not reach {target.host} "
            f"({type(exc).__name__}: {exc}); retrying later.",
            code="webhook_unreachable",
        ) from exc
    judge(status, answer, msg.job_id, target.host)
    return []


def judge(status: int, answer: str, job_id: str, host: str) -> None:
    """Return for a 2xx answer; raise `Transient` for one worth retrying, else `Permanent`."""
    said = f"{host} answered {status}" + (f": {answer}" if answer else "")
    if 200 <= status < 300:
        return
    if status in RETRYABLE_STATUSES or status >= 500 or status < 200:
        raise Transient(
            f"webhook for job {job_id}: {said}; retrying later.", code="webhook_unavailable"
        )
    if 300 <= status < 400:
        raise Permanent(
            f"webhook for job {job_id}: {said} (a redirect). Redirects are not followed: "
            "give the final URL as callback_url.",
            code="webhook_redirected",
        )
    raise Permanent(
        f"webhook for job {job_id}: {said}. The receiver refused it; fix the receiver or the "
        f"callback_url, then replay it (sluice dlq replay --job {job_id}).",
        code="webhook_rejected",
    )


async def _post(
    client: httpx.AsyncClient,
    target: CallbackTarget,
    addresses: list[str],
    body: bytes,
    headers: dict[str, str],
    extensions: dict[str, str],
) -> tuple[int, str]:
    """POST to the checked addresses in turn until one takes the connection; returns the
    status and the start of the answer (a receiver's answer is read only so far)."""
    for n, address in enumerate(addresses):
        request = client.build_request(
            "POST", target.pinned(address), content=body, headers=headers, extensions=extensions
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.ConnectError:
            if n + 1 == len(addresses):
                raise
            continue  # nothing was sent: the next address of the name may answer
        try:
            start = b""
            async for piece in response.aiter_bytes():
                start += piece
                if len(start) >= _ANSWER_BYTES:
                    break
        finally:
            await response.aclose()
        text = start[:_ANSWER_BYTES].decode(errors="replace")
        return response.status_code, " ".join(text.split())[:_SHOWN_CHARS]
    raise AssertionError("check_addresses lets no empty address list through")


async def _addresses(target: CallbackTarget, timeout_s: float) -> list[str]:
    """Every address the target's host resolves to now (getaddrinfo runs in a thread)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        # A resolver that fails now may answer later; the upload's check found the name once.
        raise Transient(
            f"webhook: the callback host {target.host!r} did not resolve ({exc or 'timed out'}); "
            "retrying later.",
            code="webhook_unreachable",
        ) from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


STAGE = Stage(spec=pipeline.WEBHOOK, startup=startup, handle=handle, shutdown=shutdown)
