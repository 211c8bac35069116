"""Which document versions a write to the index completes.

A version (job) of several batches is stored pending, out of search, until its last batch is
in, so a version that fails half way is never half searchable; a write that completes its
version (a single batch, or the last one) stores its chunks searchable at once, which spares
the common case a second write.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from contracts.messages import EmbeddedBatch

Version = tuple[str, str]
"""A document version: (document id, job id)."""

Arrival = tuple[str, str, int]
"""A batch recorded in the ledger: (document id, job id, batch index)."""


def earlier_versions(batches: Sequence[EmbeddedBatch]) -> set[Version]:
    """The versions of `batches` whose completion depends on batches written before (those
    whose ledger rows a backend must read to call `completed_by`)."""
    return {(b.document_id, b.job_id) for b in batches if b.batch_count > 1}


def completed_by(batches: Sequence[EmbeddedBatch], arrived: Iterable[Arrival]) -> set[Version]:
    """The versions of `batches` that have every batch in once these are written, given the
    batches of them the ledger already holds."""
    seen: dict[Version, set[int]] = {}
    for document_id, job_id, batch_index in arrived:
        seen.setdefault((document_id, job_id), set()).add(batch_index)
    for b in batches:
        seen.setdefault((b.document_id, b.job_id), set()).add(b.batch_index)
    return {
        (b.document_id, b.job_id)
        for b in batches
        if len(seen[(b.document_id, b.job_id)]) >= b.batch_count
    }
