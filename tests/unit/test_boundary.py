"""The HTTP boundary on a real gateway app, in-process: the Host and Origin checks, the key
checked before the body, body limits, cursors that must not crash, and the 500 shape (no
broker: what passes the boundary stops at 503 `broker_unavailable`)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from contracts.settings import Settings
from gateway.http.app import create_app
from gateway.http.body_limits import OTHER_BODY_BYTES
from gateway.http.boundary import allowed_hosts, split_authority

FILE = {"file": ("note.txt", b"Terns migrate from pole to pole.")}
EVIL = "http://evil.example"


def _gateway(tmp_path: Path, base_url: str = "http://127.0.0.1", **settings: Any) -> TestClient:
    # No broker answers on port 1: the gateway serves and answers 503 to what needs one.
    app = create_app(
        Settings(data_dir=tmp_path, amqp_url="amqp://guest:guest@127.0.0.1:1/", **settings)
    )
    return TestClient(app, base_url=base_url, raise_server_exceptions=False)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[TestClient]:
    """An open gateway (no API keys) on loopback, reached by its loopback address."""
    with _gateway(tmp_path) as client:
        yield client


def _error(answer: Any, status: int, code: str) -> str:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error["code"] == code, error
    message: str = error["message"]
    return message


# ---- Host: DNS rebinding ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_an_open_gateway_refuses_a_host_name_it_does_not_have(tmp_path: Path, method: str) -> None:
    with _gateway(tmp_path, base_url="http://rebound.example:8000") as client:
        path = "/v1/jobs" if method == "GET" else "/v1/documents/d1"
        message = _error(client.request(method, path), 421, "host_not_allowed")
        assert "rebound.example" in message and "SLUICE_ALLOWED_HOSTS" in message


@pytest.mark.parametrize(
    "base_url", ["http://localhost:8000", "http://127.0.0.1", "http://[::1]:8000"]
)
def test_an_open_gateway_answers_to_its_loopback_names(tmp_path: Path, base_url: str) -> None:
    with _gateway(tmp_path, base_url=base_url) as client:
        assert client.get("/v1/jobs").status_code == 200


def test_probes_answer_whatever_host_they_dial(tmp_path: Path) -> None:
    with _gateway(tmp_path, base_url="http://10.1.2.3:8000") as client:
        assert client.get("/healthz").status_code == 200
        _error(client.get("/metrics"), 421, "host_not_allowed")


def test_the_allowed_hosts_setting_replaces_the_default_even_with_keys(tmp_path: Path) -> None:
    settings = {"allowed_hosts": "sluice.internal, Docs.Example.", "api_keys": "k"}
    key = {"Authorization": "Bearer k"}
    with _gateway(tmp_path / "a", base_url="http://sluice.internal:8000", **settings) as named:
        assert named.get("/v1/jobs", headers=key).status_code == 200
    with _gateway(tmp_path / "b", base_url="http://docs.example", **settings) as cased:
        assert cased.get("/v1/jobs", headers=key).status_code == 200
    with _gateway(tmp_path / "c", base_url="http://localhost", **settings) as other:
        _error(other.get("/v1/jobs", headers=key), 421, "host_not_allowed")


def test_a_keyed_gateway_answers_any_host_by_default(tmp_path: Path) -> None:
    with _gateway(tmp_path, base_url="http://gateway.svc:8000", api_keys="k") as client:
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer k"}).status_code == 200


def test_the_default_host_list() -> None:
    loopback = frozenset({"localhost", "127.0.0.1", "::1"})
    assert allowed_hosts(Settings(host="127.0.0.1")) == loopback
    assert allowed_hosts(Settings(host="sluice.lan")) == loopback | {"sluice.lan"}
    # A wildcard listen address is no name a client uses.
    assert allowed_hosts(Settings(host="0.0.0.0", allow_open=True)) == loopback
    assert allowed_hosts(Settings(allowed_hosts="*")) is None
    listed = allowed_hosts(Settings(allowed_hosts="Sluice.LAN:8000, [::1], ,"))
    assert listed == frozenset({"sluice.lan", "::1"})
    assert allowed_hosts(Settings(api_keys="k")) is None


@pytest.mark.parametrize("entry", ["http://sluice.lan", "user@sluice.lan", "two names"])
def test_an_allowed_host_that_is_no_host_name_is_refused_at_start(entry: str) -> None:
    with pytest.raises(ValueError, match="SLUICE_ALLOWED_HOSTS"):
        Settings(allowed_hosts=entry)


def test_authorities_split_into_host_and_port() -> None:
    assert split_authority("LocalHost:8000", "http") == ("localhost", 8000)
    assert split_authority("[::1]:9", "http") == ("::1", 9)
    assert split_authority("[::1]", "https") == ("::1", 443)
    assert split_authority("example.com", "http") == ("example.com", 80)
    assert split_authority("example.com:", "http") == ("example.com", 80)


# ---- Origin: cross-site uploads through the user's browser ------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": EVIL},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:3000"},  # another port is another origin
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1"},
    ],
)
def test_an_open_gateway_refuses_an_upload_from_another_origin(
    gateway: TestClient, headers: dict[str, str]
) -> None:
    answer = gateway.post("/v1/documents", files=FILE, headers=headers)

    message = _error(answer, 403, "cross_origin_refused")
    assert "SLUICE_API_KEYS" in message
    assert gateway.get("/v1/jobs").json()["jobs"] == []


@pytest.mark.parametrize("method", ["PUT", "DELETE", "POST"])
def test_every_state_changing_method_is_checked(gateway: TestClient, method: str) -> None:
    path = "/v1/jobs/j1/retry" if method == "POST" else "/v1/documents/d1"
    answer = gateway.request(method, path, headers={"Origin": EVIL})
    _error(answer, 403, "cross_origin_refused")


def test_the_page_of_its_own_origin_may_upload(gateway: TestClient) -> None:
    headers = {"Origin": "http://127.0.0.1", "Sec-Fetch-Site": "same-origin"}
    answer = gateway.post("/v1/documents", files=FILE, headers=headers)
    # Past the boundary: only the missing broker stops it.
    _error(answer, 503, "broker_unavailable")


def test_reading_from_another_origin_is_left_to_the_browser(gateway: TestClient) -> None:
    # Without CORS headers the page cannot read the answer; nothing changes.
    assert gateway.get("/v1/jobs", headers={"Origin": EVIL}).status_code == 200


def test_with_api_keys_the_key_is_the_guard_not_the_origin(tmp_path: Path) -> None:
    with _gateway(tmp_path, api_keys="k") as client:
        keyed = client.post(
            "/v1/documents",
            files=FILE,
            headers={"Origin": EVIL, "Authorization": "Bearer k"},
        )
        _error(keyed, 503, "broker_unavailable")
        _error(
            client.post("/v1/documents", files=FILE, headers={"Origin": EVIL}), 401, "unauthorized"
        )


# ---- body sizes (streamed bodies: tests/integration/test_slow_clients.py) -------------


def test_a_json_body_past_its_limit_is_413(gateway: TestClient) -> None:
    big = json.dumps({"all": True, "pad": "x" * OTHER_BODY_BYTES})
    answer = gateway.post(
        "/v1/dead-letters/replay",
        content=big,
        headers={"Content-Type": "application/json"},
    )
    message = _error(answer, 413, "body_too_large")
    assert "multipart/form-data" in message


def test_a_declared_upload_past_the_limit_is_413(tmp_path: Path) -> None:
    with _gateway(tmp_path, max_upload_bytes=1000) as client:
        answer = client.post("/v1/documents", files={"file": ("a.txt", b"a" * 200_000)})
        message = _error(answer, 413, "file_too_large")
        assert "1000 byte limit" in message


# ---- no input reaches a 500 ---------------------------------------------------------------


def test_a_deeply_nested_cursor_is_an_invalid_cursor(gateway: TestClient) -> None:
    nested = base64.urlsafe_b64encode(b"[" * 5000).decode()
    message = _error(gateway.get("/v1/jobs", params={"cursor": nested}), 400, "invalid_cursor")
    assert len(message) < 300


def test_deeply_nested_json_is_a_400(gateway: TestClient) -> None:
    answer = gateway.post(
        "/v1/dead-letters/replay",
        content=b"[" * 100_000,
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"] == "application/json"


def test_an_unexpected_error_answers_500_in_the_api_shape(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = gateway.app.state.services  # type: ignore[attr-defined]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals: /var/lib/sluice/jobs.sqlite3")

    monkeypatch.setattr(services.store, "page", broken)
    answer = gateway.get("/v1/jobs")

    message = _error(answer, 500, "internal_error")
    assert "secret" not in answer.text and "RuntimeError" not in answer.text
    assert "log" in message
