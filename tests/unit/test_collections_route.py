"""`GET /v1/collections` and `/v1/collections/{c}` on a real gateway app (no broker needed:
the answer comes from the job store)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from contracts.settings import Settings
from gateway.http.app import create_app
from gateway.store.base import NewJob


def _record(settings: Settings, job_id: str, collection: str) -> None:
    """A document recorded in `collection`, as an upload leaves it."""
    from gateway.store.base import open_job_store

    store = open_job_store(settings)
    job = NewJob(job_id, f"doc-{job_id}", collection, "a.txt", "text/plain", 3, job_id * 8)
    assert store.create(job) is None


def test_collections_list_what_the_key_may_use(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        amqp_url="amqp://guest:guest@127.0.0.1:1/",
        api_keys="root,red-only:red",
    )
    for job_id, collection in (("a1", "red"), ("a2", "red"), ("b1", "blue")):
        _record(settings, job_id, collection)

    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:

        def get(path: str, key: str) -> tuple[int, dict[str, Any]]:
            answer = client.get(path, headers={"Authorization": f"Bearer {key}"})
            return answer.status_code, answer.json()

        # Never re-indexed: generation 0, built with the deployment's settings.
        built = {
            "chunk_max_tokens": settings.chunk_max_tokens,
            "chunk_overlap_tokens": settings.chunk_overlap_tokens,
            "model": settings.embed_model_name,
        }
        serving = {"generation": {"number": 0, **built}, "settings": built, "reindex": None}
        assert get("/v1/collections", "root") == (
            200,
            {
                "collections": [
                    {"collection": "blue", "documents": 1, "chunks": 0, **serving},
                    {"collection": "red", "documents": 2, "chunks": 0, **serving},
                ]
            },
        )
        status, body = get("/v1/collections", "red-only")
        assert (status, [c["collection"] for c in body["collections"]]) == (200, ["red"])
        assert get("/v1/collections/red", "root")[1]["documents"] == 2
        assert get("/v1/collections/blue", "red-only")[0] == 403
        assert get("/v1/collections/green", "root")[0] == 404
        assert get("/v1/collections/Not%20Valid", "root")[0] == 400
