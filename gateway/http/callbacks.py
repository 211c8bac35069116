"""An upload's `callback_url`: the one it names, else its API key's default
(`SLUICE_KEY_CALLBACK_URLS`), checked before the job is recorded.

The rules are contracts/callback_target.py's, the same the webhook stage applies again when
it sends; a refusal is a 400 `invalid_callback_url` that says what to change.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Annotated

from fastapi import Depends, Request

from contracts.callback_target import (
    CallbackRefused,
    CallbackTarget,
    check_addresses,
    parse_callback_url,
)
from contracts.settings import Settings
from gateway.http.errors import ApiError
from gateway.http.services import ServicesDep


def caller_api_key(request: Request, services: ServicesDep) -> str | None:
    """The API key the request authenticated with (the routers' `require_api_key` checked it),
    or None on a gateway without keys."""
    if not services.api_keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


ApiKeyDep = Annotated[str | None, Depends(caller_api_key)]


async def resolve_callback_url(
    given: str | None, api_key: str | None, settings: Settings
) -> str | None:
    """The callback URL a job gets: the upload's own, else its key's default, else None;
    raises a 400 `invalid_callback_url` when the URL may not be called."""
    if given is not None and given.strip():
        url, whose = given.strip(), "callback_url"
    elif api_key is not None and api_key in settings.key_callback_urls:
        url, whose = settings.key_callback_urls[api_key], "default"
    else:
        return None
    try:
        target = parse_callback_url(url)
        addresses = await _addresses(target, settings.webhook_timeout_s)
        check_addresses(target, addresses, allow_private=settings.webhook_allow_private)
    except CallbackRefused as exc:
        message = exc.message
        if whose == "default":
            # The caller sent no URL: the fault is in the deployment's settings, not the upload.
            message = (
                "This API key's default callback URL (SLUICE_KEY_CALLBACK_URLS) is refused: "
                f"{message} Ask the operator to fix it, or send a callback_url of your own."
            )
        raise ApiError(400, exc.code, message) from exc
    return url


async def _addresses(target: CallbackTarget, timeout_s: float) -> list[str]:
    """Every address the target's host resolves to, resolved in a thread (getaddrinfo blocks)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM), timeout_s
        )
    except (OSError, TimeoutError) as exc:
        reason = "did not answer in time" if isinstance(exc, TimeoutError) else str(exc)
        raise CallbackRefused(
            f"callback_url host {target.host!r} could not be resolved ({reason}); check the "
            "name, or use an address the gateway can resolve."
        ) from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))
