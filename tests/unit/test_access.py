"""API keys bound to collections: parsing `SLUICE_API_KEYS`, checking a request's key, and the
gateway refusing to listen beyond loopback with no keys at all."""

from __future__ import annotations

import os
import subprocess
from types import SimpleNamespace
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from pipeline import sluice_command

from contracts.errors import SluiceError
from contracts.settings import Settings
from gateway.http import errors
from gateway.http.services import (
    Access,
    ApiKey,
    is_loopback,
    parse_api_keys,
    refuse_open_exposure,
    require_api_key,
)


def test_keys_open_every_collection_or_the_ones_they_name() -> None:
    keys = parse_api_keys(" alpha:red|blue , beta:green,root,")
    assert keys == (
        ApiKey(b"alpha", Access(frozenset({"red", "blue"}))),
        ApiKey(b"beta", Access(frozenset({"green"}))),
        ApiKey(b"root", Access(None)),
    )
    alpha, beta, root = (key.access for key in keys)
    assert alpha.allows("red") and alpha.allows("blue") and not alpha.allows("green")
    assert not beta.unrestricted and root.unrestricted and root.allows("anything")


@pytest.mark.parametrize("raw", [None, "", "  "])
def test_no_keys_means_an_open_gateway(raw: str | None) -> None:
    assert parse_api_keys(raw) == ()


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("alpha:", "invalid collection"),
        ("alpha:red|", "invalid collection"),
        ("alpha:Red", "invalid collection"),
        (":red", "empty key"),
        ("al pha", "spaces"),
        ("alpha,beta,alpha:red", "entry 3 repeats a key"),
        (",,", "no key"),
    ],
)
def test_a_malformed_value_is_a_usage_error_that_never_echoes_a_key(raw: str, problem: str) -> None:
    with pytest.raises(SluiceError) as caught:
        parse_api_keys(raw)
    assert caught.value.code == "usage_error"
    assert problem in caught.value.message and "SLUICE_API_KEYS" in caught.value.message
    assert "alpha" not in caught.value.message


def test_forbidden_collection_is_a_403_naming_what_the_key_may_use() -> None:
    access = Access(frozenset({"red", "blue"}))
    access.require("red")
    with pytest.raises(errors.ApiError) as caught:
        access.require("green")
    assert (caught.value.status, caught.value.code) == (403, "collection_forbidden")
    assert "blue, red" in caught.value.message


def _app(raw_keys: str | None) -> TestClient:
    app = FastAPI()
    errors.install(app)
    app.state.services = SimpleNamespace(api_keys=parse_api_keys(raw_keys))

    @app.get("/whoami")
    async def whoami(access: Annotated[Access, Depends(require_api_key)]) -> dict[str, object]:
        return {"collections": sorted(access.collections) if access.collections else None}

    return TestClient(app, base_url="http://127.0.0.1")


def test_the_request_key_decides_the_access() -> None:
    client = _app("alpha:red|blue,root")

    def ask(authorization: str | bytes | None) -> tuple[int, object]:
        value = authorization.encode() if isinstance(authorization, str) else authorization
        headers = [(b"authorization", value)] if value else []
        answer = client.get("/whoami", headers=headers)
        body = answer.json()
        return answer.status_code, body.get("collections", body.get("error", {}).get("code"))

    assert ask("Bearer alpha") == (200, ["blue", "red"])
    assert ask("bearer root") == (200, None)
    for wrong in (None, "Bearer", "Bearer alph", "Bearer alpha2", "alpha", "Basic alpha"):
        assert ask(wrong) == (401, "unauthorized"), wrong
    # Non-ASCII bytes must not crash the constant-time comparison.
    assert ask("Bearer \u00e9t\u00e9".encode()) == (401, "unauthorized")


def test_without_keys_every_request_is_open() -> None:
    answer = _app(None).get("/whoami")
    assert answer.status_code == 200 and answer.json() == {"collections": None}


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.1.2.3", False),
        ("gateway.internal", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_listening_beyond_loopback_needs_keys_or_an_explicit_opt_in() -> None:
    with pytest.raises(SluiceError) as caught:
        refuse_open_exposure(Settings(host="0.0.0.0", api_keys=None))
    assert caught.value.code == "usage_error"
    assert "SLUICE_ALLOW_OPEN" in caught.value.message and "SLUICE_API_KEYS" in caught.value.message
    refuse_open_exposure(Settings(host="0.0.0.0", api_keys="k"))
    refuse_open_exposure(Settings(host="0.0.0.0", allow_open=True))
    refuse_open_exposure(Settings(host="127.0.0.1"))


def _gateway_exit(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*sluice_command(), "gateway"],
        env={**os.environ, "SLUICE_PORT": "1", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_gateway_refuses_to_start_open_on_every_interface() -> None:
    refused = _gateway_exit(SLUICE_HOST="0.0.0.0")
    assert refused.returncode == 2, refused.stderr
    assert "refusing to listen on '0.0.0.0' without API keys" in refused.stderr
    malformed = _gateway_exit(SLUICE_API_KEYS="alpha:")
    assert malformed.returncode == 2, malformed.stderr
    assert "SLUICE_API_KEYS is malformed" in malformed.stderr
