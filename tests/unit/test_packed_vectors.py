"""An embedded batch's vectors ride packed (version 2) and are checked on the way in: a body
whose vectors do not fit its chunks, hold NaN or inf, or name an absurd dimension is refused
with a validation error, which the index stage's runtime dead-letters (never a crash). A
version 1 body (vectors as lists) reads as the same batch."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from contracts import routing
from contracts.messages import MAX_DIMENSIONS, Chunk, EmbeddedBatch, PackedVectors
from contracts.settings import Settings
from contracts.topology import ERROR_CODE_HEADER, ERROR_HEADER
from stages.backends.lance_index import LanceIndex
from stages.builtin import index
from stages.runtime.memory_broker import MemoryBroker
from stages.runtime.outcome import DeadLetter, Done
from stages.runtime.runner import StageRunner

NS = "packed"
INDEX_QUEUE = routing.stage_queue(NS, "index")
DEAD = routing.dead_letter_queue(NS)


def unit_rows(count: int, dimensions: int = 8, seed: int = 0) -> np.ndarray:
    """`count` random unit vectors, float32."""
    rows = np.random.default_rng(seed).standard_normal((count, dimensions)).astype(np.float32)
    normalised: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return normalised


def batch(vectors: Any, *, chunks: int | None = None, document: str = "d1") -> EmbeddedBatch:
    """A one-batch document with a chunk per vector (or `chunks` of them)."""
    packed = PackedVectors.pack(vectors)
    n = packed.count if chunks is None else chunks
    return EmbeddedBatch(
        job_id="j1",
        document_id=document,
        collection="default",
        filename="terns.md",
        batch_index=0,
        batch_count=1,
        chunks_total=max(1, n),
        chunks=[
            Chunk(chunk_id=f"{document}-{i}", chunk_index=i, text=f"tern {i}") for i in range(n)
        ],
        vectors=packed,
    )


def body(msg: EmbeddedBatch, **vectors: Any) -> bytes:
    """`msg`'s JSON body with fields of its `vectors` replaced (as a forger would)."""
    fields = json.loads(msg.model_dump_json())
    fields["vectors"].update(vectors)
    return json.dumps(fields).encode()


def version_1(msg: EmbeddedBatch) -> dict[str, Any]:
    """`msg` as the release before packing wrote it: each chunk with its `vector` list."""
    fields: dict[str, Any] = json.loads(msg.model_dump_json())
    rows = fields.pop("vectors")
    vectors = np.frombuffer(base64.urlsafe_b64decode(rows["data"]), "<f4").reshape(
        rows["count"], rows["dimensions"]
    )
    for chunk, vector in zip(fields["chunks"], vectors.tolist(), strict=True):
        chunk["vector"] = vector
    fields["version"] = 1
    return fields


def refused(raw: bytes | str) -> str:
    """Why `raw` is not a valid embedded batch."""
    with pytest.raises(ValidationError) as raised:
        EmbeddedBatch.model_validate_json(raw)
    return str(raised.value)


def test_a_packed_batch_reads_back_as_the_same_matrix_and_is_version_2() -> None:
    matrix = unit_rows(64, 384)
    sent = batch(matrix)
    raw = sent.model_dump_json()
    read = EmbeddedBatch.model_validate_json(raw)
    assert read == sent and read.version == 2
    assert read.matrix.dtype == np.float32 and read.matrix.shape == (64, 384)
    assert np.array_equal(read.matrix, matrix)
    assert len(raw) < len(json.dumps(version_1(sent))) / 3


def test_a_version_1_body_reads_as_the_same_batch() -> None:
    sent = batch(unit_rows(3))
    read = EmbeddedBatch.model_validate_json(json.dumps(version_1(sent)))
    assert read == sent
    assert read.version == 2
    empty = version_1(batch(np.empty((0, 8), np.float32)))
    assert EmbeddedBatch.model_validate_json(json.dumps(empty)).chunks == []


def test_vectors_that_do_not_fill_their_bytes_are_refused() -> None:
    sent = batch(unit_rows(2))
    short = base64.b64encode(sent.vectors.data[:-4]).decode()
    assert "60 bytes of vectors, where 2 vectors of 8 float32s take 64" in refused(
        body(sent, data=short)
    )
    assert "take 48" in refused(body(sent, dimensions=6))
    assert "valid base64" in refused(body(sent, data="not base64!"))


def test_a_vector_per_chunk_or_the_batch_is_refused() -> None:
    two = base64.b64encode(unit_rows(2).tobytes()).decode()
    assert "2 vectors for 3 chunks" in refused(body(batch(unit_rows(3)), count=2, data=two))
    with pytest.raises(ValidationError, match="3 vectors for 2 chunks"):
        batch(unit_rows(3), chunks=2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinite_values_are_refused_packed_or_as_lists(bad: float) -> None:
    rows = unit_rows(3)
    rows[1, 4] = bad
    packed = base64.b64encode(rows.tobytes()).decode()
    assert "vectors [1] (row numbers) hold NaN or infinite" in refused(
        body(batch(unit_rows(3)), data=packed)
    )
    old = version_1(batch(unit_rows(3)))
    old["chunks"][1]["vector"][4] = bad
    assert "hold NaN or infinite" in refused(json.dumps(old))


def test_a_float_beyond_float32_is_refused_not_stored_as_infinity() -> None:
    old = version_1(batch(unit_rows(1)))
    old["chunks"][0]["vector"][0] = 1e300
    assert "hold NaN or infinite" in refused(json.dumps(old))


def test_dimensions_beyond_the_maximum_or_mismatched_are_refused() -> None:
    wide = MAX_DIMENSIONS + 1
    data = base64.b64encode(bytes(4 * wide)).decode()
    assert "less than or equal to 16000" in refused(
        body(batch(unit_rows(1)), dimensions=wide, data=data)
    )
    assert "1 vectors of 0 dimensions" in refused(body(batch(unit_rows(1)), dimensions=0, data=""))
    old = version_1(batch(unit_rows(2)))
    old["chunks"][1]["vector"] = old["chunks"][1]["vector"][:5]
    assert "differ in length" in refused(json.dumps(old))
    del old["chunks"][0]["vector"]
    assert "needs a `vector` in every chunk" in refused(json.dumps(old))


async def test_the_index_stage_dead_letters_a_broken_batch_and_indexes_the_next(
    tmp_path: Path,
) -> None:
    settings = Settings(namespace=NS, transient_retries=0)
    broker = MemoryBroker(settings)
    lance = LanceIndex(tmp_path / "index")
    ctx = index.context_for(lance, max_batches=1, max_wait_s=0)
    runner = StageRunner(index.STAGE, ctx, settings, broker)
    rows = unit_rows(2)
    rows[0, 0] = math.nan
    forged = body(batch(unit_rows(2)), data=base64.b64encode(rows.tobytes()).decode())
    good = batch(unit_rows(2, seed=1), document="d2")
    outcomes = []
    for raw in (forged, good.model_dump_json().encode()):
        broker.put(INDEX_QUEUE, raw, routing_key=routing.DOC_EMBEDDED)
        outcomes.append(await runner.process(broker.take(INDEX_QUEUE)))
    assert [type(o) for o in outcomes] == [DeadLetter, Done]
    (dead,) = broker.messages(DEAD)
    assert dead.headers[ERROR_CODE_HEADER] == "invalid_message"
    assert "NaN or infinite" in dead.headers[ERROR_HEADER]
    assert lance.chunk_ids("default", "d1") == []
    assert sorted(lance.chunk_ids("default", "d2")) == ["d2-0", "d2-1"]
    (hit,) = lance.search("default", good.matrix[1].tolist(), k=1)
    assert hit.chunk_id == "d2-1"
