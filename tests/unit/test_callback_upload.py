"""The upload routes' `callback_url` field on a real gateway app (no broker: a refusal comes
before anything is stored or published)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from contracts.settings import Settings
from gateway.http.app import create_app

FILE = {"file": ("note.txt", b"Terns migrate from pole to pole.")}


def _gateway(tmp_path: Path, **settings: Any) -> Iterator[TestClient]:
    # No broker answers on port 1: the gateway serves and answers 503 to what needs one.
    app = create_app(
        Settings(data_dir=tmp_path, amqp_url="amqp://guest:guest@127.0.0.1:1/", **settings)
    )
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[TestClient]:
    """A gateway with the default rules: callbacks to private addresses refused."""
    yield from _gateway(tmp_path)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/hook", "http://[::1]/hook", "http://localhost/hook"]
)
def test_a_loopback_callback_is_refused_400_without_the_setting(
    gateway: TestClient, url: str
) -> None:
    answer = gateway.post("/v1/documents", files=FILE, data={"callback_url": url})

    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_callback_url"
    assert "loopback address" in error["message"]
    assert "SLUICE_WEBHOOK_ALLOW_PRIVATE" in error["message"]
    # Nothing was recorded for the refused upload.
    assert gateway.get("/v1/jobs").json()["jobs"] == []


def test_a_callback_with_credentials_is_refused(gateway: TestClient) -> None:
    answer = gateway.post(
        "/v1/documents", files=FILE, data={"callback_url": "https://u:p@example.com/in"}
    )
    assert answer.status_code == 400
    assert "credentials" in answer.json()["error"]["message"]


def test_with_the_setting_a_loopback_callback_passes_the_check(tmp_path: Path) -> None:
    for client in _gateway(tmp_path, webhook_allow_private=True):
        answer = client.post(
            "/v1/documents", files=FILE, data={"callback_url": "http://127.0.0.1:9/hook"}
        )
        # Past the callback check, the upload stops only for want of a broker.
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "broker_unavailable"


def test_a_key_default_is_checked_like_an_upload_of_its_own(tmp_path: Path) -> None:
    for client in _gateway(
        tmp_path,
        api_keys="key-a,key-b",
        key_callback_urls={"key-a": "http://10.0.0.5/hook"},
    ):
        refused = client.post(
            "/v1/documents", files=FILE, headers={"Authorization": "Bearer key-a"}
        )
        assert refused.status_code == 400, refused.text
        message = refused.json()["error"]["message"]
        assert "SLUICE_KEY_CALLBACK_URLS" in message and "10.0.0.5" in message
        # Another key has no default: its upload goes on (to the missing broker).
        other = client.post("/v1/documents", files=FILE, headers={"Authorization": "Bearer key-b"})
        assert other.status_code == 503, other.text
