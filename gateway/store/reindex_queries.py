"""The re-indexing queries, written once for both job stores (gateway/store/reindex_base.py
says what they keep and why).

Each is SQL both SQLite and PostgreSQL read alike once rendered for a `Dialect`: its table
names (PostgreSQL's have a `sluice_` prefix), its placeholders (`:name` or `%(name)s`), its
clock and its row lock. Every function runs inside the transaction its store opened: SQLite's
holds the write lock from its first statement; on PostgreSQL the reindex's row is locked
(`FOR UPDATE`) first, so two gateways' monitors never add the same document twice.

A document's *source* is its newest indexed upload job (never a reindex job): its parsed
text is what a reindex chunks and embeds again, whatever generation it was written to.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from contracts.messages import IndexProfile
from contracts.routing import BULK
from gateway.store.job_rows import Row, as_time
from gateway.store.reindex_base import (
    ACTIVE,
    Reindex,
    ReindexInProgress,
    ReindexJob,
    Serving,
)


class Rows(Protocol):
    """What a cursor of either database offers after `execute`."""

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


Execute = Callable[[str, Mapping[str, object]], Rows]


@dataclass(frozen=True)
class Dialect:
    """How one database spells the queries: table prefix, placeholders, clock, row lock."""

    prefix: str
    named: Callable[[str], str]
    now: str
    lock: str

    def render(self, sql: str) -> str:
        """The SQL for this database."""
        body = re.sub(r"(?<![:\w]):([a-z_][a-z0-9_]*)", lambda m: self.named(m.group(1)), sql)
        p = self.prefix
        return body.format(
            jobs=f"{p}jobs",
            documents=f"{p}documents",
            collections=f"{p}collections",
            reindexes=f"{p}reindexes",
            now=self.now,
            lock=self.lock,
        )


SQLITE = Dialect(prefix="", named=lambda n: f":{n}", now=":now", lock="")
POSTGRES = Dialect(
    prefix="sluice_",
    named=lambda n: f"%({n})s",
    now="COALESCE(%(now)s::timestamptz, now())",
    lock=" FOR UPDATE",
)

_ENDED = "('indexed', 'failed')"
# Every live document of :collection with an indexed version, as that version's job row.
_SOURCES = (
    "SELECT u.* FROM {documents} d JOIN {jobs} u ON u.job_id = (SELECT v.job_id FROM {jobs} v"
    " WHERE v.document_id = d.document_id AND v.reindex_id IS NULL AND v.status = 'indexed'"
    " ORDER BY v.created_at DESC, v.job_id DESC LIMIT 1) WHERE d.collection = :collection"
)
# Sources the reindex :reindex_id still has to take: not in its generation :generation, no
# job of it for this version, none of it in flight for the document (so two versions of one
# document are never written into the new generation at once, out of order).
_TO_ADD = (
    f"SELECT s.* FROM ({_SOURCES}) s WHERE s.generation != :generation"
    " AND NOT EXISTS (SELECT 1 FROM {jobs} k WHERE k.reindex_id = :reindex_id"
    "  AND k.source_job_id = s.job_id)"
    " AND NOT EXISTS (SELECT 1 FROM {jobs} k WHERE k.reindex_id = :reindex_id"
    f"  AND k.document_id = s.document_id AND k.status NOT IN {_ENDED})"
)
_COUNTS = (
    "SELECT COUNT(*) AS total,"
    " COALESCE(SUM(CASE WHEN s.generation = :generation OR EXISTS (SELECT 1 FROM {jobs} k"
    "  WHERE k.reindex_id = :reindex_id AND k.source_job_id = s.job_id"
    "  AND k.status = 'indexed') THEN 1 ELSE 0 END), 0) AS done,"
    " COALESCE(SUM(CASE WHEN EXISTS (SELECT 1 FROM {jobs} k"
    "  WHERE k.reindex_id = :reindex_id AND k.source_job_id = s.job_id"
    "  AND k.status = 'failed') THEN 1 ELSE 0 END), 0) AS failed"
    f" FROM ({_SOURCES}) s"
)
# An upload of the collection in the pipeline: the switch waits for it, so it is never
# written into the generation that is about to go.
_UPLOAD_IN_FLIGHT = (
    "SELECT 1 FROM {jobs} j JOIN {documents} d ON d.current_job_id = j.job_id"
    " WHERE j.collection = :collection AND j.reindex_id IS NULL AND j.admitted_at IS NOT NULL"
    f" AND j.status NOT IN {_ENDED} LIMIT 1"
)
_JOB_OF_REINDEX = (
    "SELECT j.*, r.generation AS target, r.profile AS target_profile FROM {jobs} j"
    " JOIN {reindexes} r ON r.reindex_id = j.reindex_id"
)
# The collection's serving generation, from its record (0 before its first switch).
SERVING_GENERATION = (
    "COALESCE((SELECT c.generation FROM {collections} c WHERE c.collection = {jobs}.collection), 0)"
)


def profile_json(profile: IndexProfile | None) -> str | None:
    """A profile as stored (None: the deployment's settings)."""
    return profile.model_dump_json() if profile is not None else None


def profile_of(raw: str | None) -> IndexProfile | None:
    """A stored profile."""
    return IndexProfile.model_validate_json(raw) if raw else None


def reindex_of(row: Row) -> Reindex:
    """A reindex from its row."""
    created = as_time(row["created_at"])
    assert created is not None  # a NOT NULL column
    return Reindex(
        reindex_id=row["reindex_id"],
        collection=row["collection"],
        generation=int(row["generation"]),
        from_generation=int(row["from_generation"]),
        profile=profile_of(row["profile"]) or IndexProfile(),
        state=row["state"],
        created_at=created,
        finished_at=as_time(row["finished_at"]),
        documents_total=int(row["documents_total"]),
        documents_done=int(row["documents_done"]),
        documents_failed=int(row["documents_failed"]),
        dropped=bool(row["dropped"]),
    )


def _job_of(row: Row) -> ReindexJob:
    return ReindexJob(
        job_id=row["job_id"],
        reindex_id=row["reindex_id"],
        document_id=row["document_id"],
        collection=row["collection"],
        filename=row["filename"],
        blob_sha256=row["blob_sha256"],
        parsed_sha256=row["parsed_sha256"],
        pages=row["pages"],
        generation=int(row["target"]),
        profile=profile_of(row["target_profile"]),
        source_generation=int(row["source_generation"]),
    )


class ReindexQueries:
    """The queries, bound to one dialect; each takes the transaction's `execute`."""

    def __init__(self, dialect: Dialect) -> None:
        self.d = dialect

    def _run(self, ex: Execute, sql: str, params: Mapping[str, object]) -> Rows:
        return ex(self.d.render(sql), params)

    def serving(self, ex: Execute, collection: str) -> Serving:
        """The collection's serving record."""
        row = self._run(
            ex,
            "SELECT generation, profile FROM {collections} WHERE collection = :collection",
            {"collection": collection},
        ).fetchone()
        if row is None:
            return Serving()
        return Serving(int(row["generation"]), profile_of(row["profile"]))

    def index_target(self, ex: Execute, job_id: str) -> Serving:
        """The generation a job builds and that generation's profile."""
        row = self._run(
            ex,
            "SELECT collection, generation FROM {jobs} WHERE job_id = :job_id",
            {"job_id": job_id},
        ).fetchone()
        if row is None:
            return Serving()
        collection, generation = row["collection"], int(row["generation"])
        serving = self.serving(ex, collection)
        if serving.generation == generation:
            return serving
        # A generation not served (yet, or any more): its reindex's profile says how it is built.
        built = self._run(
            ex,
            "SELECT profile FROM {reindexes} WHERE collection = :collection"
            " AND generation = :generation",
            {"collection": collection, "generation": generation},
        ).fetchone()
        return Serving(generation, profile_of(built["profile"]) if built else None)

    def restamp(self, ex: Execute, job_id: str) -> None:
        """Point a job at its collection's serving generation."""
        self._run(
            ex,
            f"UPDATE {{jobs}} SET generation = {SERVING_GENERATION} WHERE job_id = :job_id",
            {"job_id": job_id},
        )

    def start(
        self, ex: Execute, now: object, reindex_id: str, collection: str, profile: IndexProfile
    ) -> Reindex:
        """Record a running reindex into the next unused generation (the serving profile's
        settings kept where `profile` names none)."""
        active = self.active(ex, collection)
        if active is not None:
            raise ReindexInProgress(collection, active.reindex_id)
        serving = self.serving(ex, collection)
        kept = serving.profile.model_dump() if serving.profile else {}
        asked = profile.model_dump(exclude_none=True)
        merged = IndexProfile.model_validate({**kept, **asked})
        row = self._run(
            ex,
            "SELECT COALESCE(MAX(generation), 0) AS g FROM {reindexes}"
            " WHERE collection = :collection",
            {"collection": collection},
        ).fetchone()
        target = max(serving.generation, int(row["g"])) + 1
        self._run(
            ex,
            "INSERT INTO {reindexes} (reindex_id, collection, generation, from_generation,"
            " profile, state, created_at) VALUES (:reindex_id, :collection, :generation,"
            " :from_generation, :profile, 'running', {now})",
            {
                "reindex_id": reindex_id,
                "collection": collection,
                "generation": target,
                "from_generation": serving.generation,
                "profile": json.dumps(merged.model_dump(exclude_none=True)),
                "now": now,
            },
        )
        self._count(ex, self._locked(ex, reindex_id))
        found = self.get(ex, reindex_id)
        assert found is not None
        return found

    def get(self, ex: Execute, reindex_id: str) -> Reindex | None:
        """One reindex."""
        row = self._run(
            ex, "SELECT * FROM {reindexes} WHERE reindex_id = :r", {"r": reindex_id}
        ).fetchone()
        return reindex_of(row) if row else None

    def _locked(self, ex: Execute, reindex_id: str) -> Reindex:
        row = self._run(
            ex, "SELECT * FROM {reindexes} WHERE reindex_id = :r{lock}", {"r": reindex_id}
        ).fetchone()
        assert row is not None, reindex_id
        return reindex_of(row)

    def active(self, ex: Execute, collection: str) -> Reindex | None:
        """The collection's active reindex."""
        row = self._run(
            ex,
            f"SELECT * FROM {{reindexes}} WHERE collection = :collection AND state IN {ACTIVE!r}",
            {"collection": collection},
        ).fetchone()
        return reindex_of(row) if row else None

    def latest(self, ex: Execute) -> dict[str, Reindex]:
        """Each collection's newest reindex (the active one, if any: it is always newest)."""
        rows = self._run(
            ex,
            "SELECT * FROM {reindexes} r WHERE r.created_at = (SELECT MAX(o.created_at)"
            " FROM {reindexes} o WHERE o.collection = r.collection) ORDER BY r.reindex_id",
            {},
        ).fetchall()
        return {r["collection"]: reindex_of(r) for r in rows}

    def to_watch(self, ex: Execute, since: object) -> list[Reindex]:
        """Active reindexes, ended ones not dropped, done ones switched after `since`."""
        rows = self._run(
            ex,
            f"SELECT * FROM {{reindexes}} WHERE state IN {ACTIVE!r} OR dropped = 0"
            " OR (state = 'done' AND finished_at > :since) ORDER BY created_at",
            {"since": since},
        ).fetchall()
        return [reindex_of(r) for r in rows]

    def add_jobs(self, ex: Execute, now: object, reindex_id: str, room: int) -> list[ReindexJob]:
        """Record jobs for the sources the reindex still has to take, up to `room` in flight."""
        reindex = self._locked(ex, reindex_id)
        serving = self.serving(ex, reindex.collection)
        if reindex.state in ("cancelled", "failed"):
            return []
        if reindex.state == "done" and serving.generation != reindex.generation:
            return []  # a later reindex took over: its own watch catches up
        free = room - self.in_flight(ex, reindex_id)
        if free <= 0:
            return []
        params = {
            "collection": reindex.collection,
            "generation": reindex.generation,
            "reindex_id": reindex_id,
            "room": free,
        }
        sources = self._run(
            ex, f"{_TO_ADD} ORDER BY s.created_at, s.job_id LIMIT :room", params
        ).fetchall()
        ids = []
        for source in sources:
            job_id = uuid.uuid4().hex
            ids.append(job_id)
            self._run(
                ex,
                "INSERT INTO {jobs} (job_id, document_id, collection, filename, content_type,"
                " size_bytes, blob_sha256, parsed_sha256, pages, status, created_at, updated_at,"
                " priority, admitted_at, stage_since, reindex_id, source_job_id, generation)"
                " VALUES (:job_id, :document_id, :collection, :filename, :content_type,"
                " :size_bytes, :blob_sha256, :parsed_sha256, :pages, 'queued', {now}, {now},"
                " :priority, {now}, {now}, :reindex_id, :source_job_id, :generation)",
                {
                    "job_id": job_id,
                    "document_id": source["document_id"],
                    "collection": source["collection"],
                    "filename": source["filename"],
                    "content_type": source["content_type"],
                    "size_bytes": source["size_bytes"],
                    "blob_sha256": source["blob_sha256"],
                    "parsed_sha256": source["parsed_sha256"],
                    "pages": source["pages"],
                    "priority": BULK,
                    "reindex_id": reindex_id,
                    "source_job_id": source["job_id"],
                    "generation": reindex.generation,
                    "now": now,
                },
            )
        return self._jobs(ex, ids)

    def _jobs(self, ex: Execute, ids: list[str]) -> list[ReindexJob]:
        found = []
        for job_id in ids:
            row = self._run(
                ex,
                f"SELECT t.*, s.generation AS source_generation FROM ({_JOB_OF_REINDEX}) t"
                " JOIN {jobs} s ON s.job_id = t.source_job_id WHERE t.job_id = :job_id",
                {"job_id": job_id},
            ).fetchone()
            if row is not None:
                found.append(_job_of(row))
        return found

    def unconfirmed(
        self, ex: Execute, reindex_id: str, before: object, until: object, now: object
    ) -> list[ReindexJob]:
        """The reindex's jobs admitted before `before`, never confirmed, not leased past
        `now`; leased until `until`."""
        rows = self._run(
            ex,
            "SELECT job_id FROM {jobs} WHERE reindex_id = :r AND confirmed_at IS NULL"
            f" AND status NOT IN {_ENDED} AND admitted_at < :before"
            " AND (lease_until IS NULL OR lease_until <= {now})",
            {"r": reindex_id, "before": before, "now": now},
        ).fetchall()
        ids = [str(r["job_id"]) for r in rows]
        for job_id in ids:
            self._run(
                ex,
                "UPDATE {jobs} SET lease_until = :until WHERE job_id = :job_id",
                {"until": until, "job_id": job_id},
            )
        return self._jobs(ex, ids)

    def in_flight(self, ex: Execute, reindex_id: str) -> int:
        """The reindex's jobs not ended."""
        row = self._run(
            ex,
            f"SELECT COUNT(*) AS n FROM {{jobs}} WHERE reindex_id = :r AND status NOT IN {_ENDED}",
            {"r": reindex_id},
        ).fetchone()
        return int(row["n"])

    def _count(self, ex: Execute, reindex: Reindex) -> tuple[int, int, int]:
        params = {
            "collection": reindex.collection,
            "generation": reindex.generation,
            "reindex_id": reindex.reindex_id,
        }
        row = self._run(ex, _COUNTS, params).fetchone()
        counts = (int(row["total"]), int(row["done"]), int(row["failed"]))
        self._run(
            ex,
            "UPDATE {reindexes} SET documents_total = :t, documents_done = :d,"
            " documents_failed = :f WHERE reindex_id = :r",
            {"t": counts[0], "d": counts[1], "f": counts[2], "r": reindex.reindex_id},
        )
        return counts

    def advance(
        self, ex: Execute, now: object, reindex_id: str, *, force: bool = False
    ) -> Reindex | None:
        """Count, then fail, wait, or switch (reindex_base.ReindexStore.advance_reindex)."""
        if self.get(ex, reindex_id) is None:
            return None
        reindex = self._locked(ex, reindex_id)
        if not reindex.active:
            return reindex
        _, _, failed = self._count(ex, reindex)
        params = {
            "collection": reindex.collection,
            "generation": reindex.generation,
            "reindex_id": reindex_id,
            "now": now,
        }
        if failed:
            self._end(ex, reindex_id, "failed", now)
        elif (
            self.in_flight(ex, reindex_id)
            or self._run(ex, f"{_TO_ADD} LIMIT 1", params).fetchone() is not None
        ):
            self._set_state(ex, reindex_id, "running")
        elif not force and self._run(ex, _UPLOAD_IN_FLIGHT, params).fetchone() is not None:
            self._set_state(ex, reindex_id, "switching")
        else:
            # The switch: one row says which generation search answers from, in the same
            # transaction that ends the reindex.
            self._run(
                ex,
                "INSERT INTO {collections} (collection, generation, profile, switched_at)"
                " VALUES (:collection, :generation, :profile, {now})"
                " ON CONFLICT (collection) DO UPDATE SET generation = excluded.generation,"
                " profile = excluded.profile, switched_at = excluded.switched_at",
                {**params, "profile": profile_json(reindex.profile)},
            )
            self._end(ex, reindex_id, "done", now)
        return self.get(ex, reindex_id)

    def _set_state(self, ex: Execute, reindex_id: str, state: str) -> None:
        self._run(
            ex,
            "UPDATE {reindexes} SET state = :state WHERE reindex_id = :r",
            {"state": state, "r": reindex_id},
        )

    def _end(self, ex: Execute, reindex_id: str, state: str, now: object) -> None:
        self._run(
            ex,
            "UPDATE {reindexes} SET state = :state, finished_at = {now} WHERE reindex_id = :r",
            {"state": state, "r": reindex_id, "now": now},
        )

    def cancel(self, ex: Execute, now: object, collection: str) -> Reindex | None:
        """End the collection's active reindex as cancelled."""
        active = self.active(ex, collection)
        if active is None:
            return None
        self._locked(ex, active.reindex_id)
        self._end(ex, active.reindex_id, "cancelled", now)
        return self.get(ex, active.reindex_id)

    def mark_dropped(self, ex: Execute, reindex_id: str) -> None:
        """The obsolete generation is dropped."""
        self._run(ex, "UPDATE {reindexes} SET dropped = 1 WHERE reindex_id = :r", {"r": reindex_id})
