"""Every field a message or event carries is checked on the way in, whoever signed it: blob
names are sha256 digests, ids are tokens that can never be a path, counts and filenames are
bounded. What the gateway and the stages make themselves always passes."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from contracts.events import JobEvent
from contracts.messages import (
    FILENAME_MAX_CHARS,
    MAX_COUNT,
    Chunk,
    ChunkBatch,
    DocumentParsed,
    DocumentUploaded,
    WebhookRequest,
    chunk_id,
)

SHA = hashlib.sha256(b"some bytes").hexdigest()
JOB = uuid.uuid4().hex
DOC = uuid.uuid4().hex
ENVELOPE: dict[str, Any] = {
    "job_id": JOB,
    "document_id": DOC,
    "collection": "default",
    "filename": "report.pdf",
}
UPLOADED: dict[str, Any] = {
    **ENVELOPE,
    "blob_sha256": SHA,
    "content_type": "application/pdf",
    "size_bytes": 10,
}
PARSED: dict[str, Any] = {**ENVELOPE, "blob_sha256": SHA, "parsed_sha256": SHA, "pages": 3}
BATCH: dict[str, Any] = {
    **ENVELOPE,
    "batch_index": 0,
    "batch_count": 1,
    "chunks_total": 1,
    "chunks": [{"chunk_id": chunk_id(DOC, SHA, 0), "chunk_index": 0, "text": "terns"}],
}
EVENT: dict[str, Any] = {
    "job_id": JOB,
    "document_id": DOC,
    "stage": "parse",
    "kind": "progress",
    "parsed_sha256": SHA,
}
WEBHOOK: dict[str, Any] = {
    **ENVELOPE,
    "callback_url": "https://example.com/hook",
    "job": {"job_id": JOB},
    "delivery_id": f"{JOB}.1",
}


def rejects(model: type[BaseModel], fields: dict[str, Any], **changes: Any) -> str:
    """The error `model` raises for `fields` with `changes`; fails if it takes them."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate({**fields, **changes})
    return str(caught.value)


def test_what_sluice_makes_itself_passes() -> None:
    DocumentUploaded.model_validate(UPLOADED)
    DocumentParsed.model_validate(PARSED)
    ChunkBatch.model_validate(BATCH)
    JobEvent.model_validate(EVENT)
    WebhookRequest.model_validate(WEBHOOK)


@pytest.mark.parametrize(
    "name",
    ["../../x", "../" + SHA[3:], SHA.upper(), SHA[:63], SHA + "0", "", "sha-of-a", SHA[:-1] + "/"],
)
@pytest.mark.parametrize(
    ("model", "fields", "field"),
    [
        (DocumentUploaded, UPLOADED, "blob_sha256"),
        (DocumentParsed, PARSED, "blob_sha256"),
        (DocumentParsed, PARSED, "parsed_sha256"),
        (JobEvent, EVENT, "parsed_sha256"),
    ],
)
def test_a_blob_is_named_by_a_lowercase_sha256_only(
    model: type[BaseModel], fields: dict[str, Any], field: str, name: str
) -> None:
    assert field in rejects(model, fields, **{field: name})


@pytest.mark.parametrize("value", ["../x", "a/b", "a b", "", "A" * 3, "x" * 65, "é", "a'b", "*"])
@pytest.mark.parametrize("field", ["job_id", "document_id"])
@pytest.mark.parametrize(
    ("model", "fields"),
    [(DocumentUploaded, UPLOADED), (ChunkBatch, BATCH), (JobEvent, EVENT)],
)
def test_an_id_is_a_short_token_never_a_path(
    model: type[BaseModel], fields: dict[str, Any], field: str, value: str
) -> None:
    assert field in rejects(model, fields, **{field: value})


@pytest.mark.parametrize("value", ["../x", "a b", "", "x" * 129, "c0'; drop"])
def test_a_chunk_id_is_a_short_token(value: str) -> None:
    with pytest.raises(ValidationError, match="chunk_id"):
        Chunk(chunk_id=value, chunk_index=0, text="t")
    # A plug-in stage's own ids (not the chunk stage's hex) are fine.
    Chunk(chunk_id="added-j1-0", chunk_index=0, text="t")


def test_counts_are_non_negative_and_bounded() -> None:
    for field in ("batch_index", "chunks_total", "batch_count"):
        assert field in rejects(ChunkBatch, BATCH, **{field: -1})
        assert field in rejects(ChunkBatch, BATCH, **{field: MAX_COUNT + 1})
    assert "pages" in rejects(DocumentParsed, PARSED, pages=-1)
    assert "size_bytes" in rejects(DocumentUploaded, UPLOADED, size_bytes=2**60)
    for field in ("chunks_total", "pages", "chunks"):
        assert field in rejects(JobEvent, EVENT, **{field: -1})
    chunk = {**BATCH["chunks"][0], "chunk_index": -1}
    assert "chunk_index" in rejects(ChunkBatch, BATCH, chunks=[chunk])


def test_a_batch_lies_within_its_document() -> None:
    assert "batch_index 1 is not below batch_count 1" in rejects(ChunkBatch, BATCH, batch_index=1)
    assert "batch_index" in rejects(JobEvent, EVENT, batch_index=2, batch_count=2)


def test_filenames_media_types_and_deliveries_are_bounded() -> None:
    assert "filename" in rejects(
        DocumentUploaded, UPLOADED, filename="x" * (FILENAME_MAX_CHARS + 1)
    )
    assert "filename" in rejects(DocumentUploaded, UPLOADED, filename="")
    DocumentUploaded.model_validate({**UPLOADED, "filename": "é" * FILENAME_MAX_CHARS})
    assert "content_type" in rejects(DocumentUploaded, UPLOADED, content_type="../../x")
    assert "delivery_id" in rejects(WebhookRequest, WEBHOOK, delivery_id="../x")
    assert "language" in rejects(JobEvent, EVENT, language="../x")
