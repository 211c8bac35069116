"""The API's JSON shapes for collections' generations and reindexes (docs/API.md, Reindex)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contracts.generations import chunk_sizes
from contracts.messages import IndexProfile
from contracts.settings import Settings
from gateway.store.reindex_base import Reindex, ReindexState


class ReindexRequest(BaseModel):
    """What a reindex changes; a setting left out keeps the serving generation's."""

    model_config = ConfigDict(extra="forbid")

    chunk_max_tokens: int | None = Field(None, ge=16, le=8192)
    chunk_overlap_tokens: int | None = Field(None, ge=0, le=4096)
    # The deployment's model name, or the absolute path of a sentence-transformers directory
    # on the chunk and embed stages' hosts (and the gateway's, which embeds queries with it).
    model: str | None = Field(None, min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _names_something(self) -> ReindexRequest:
        if self.chunk_max_tokens is None and self.chunk_overlap_tokens is None and not self.model:
            raise ValueError("name at least one of chunk_max_tokens, chunk_overlap_tokens, model")
        return self

    def over(self, serving: IndexProfile | None) -> IndexProfile:
        """The profile a reindex builds: the serving one's settings, with these instead."""
        kept = serving.model_dump(exclude_none=True) if serving else {}
        asked = self.model_dump(exclude_none=True)
        return IndexProfile.model_validate({**kept, **asked})


class IndexSettings(BaseModel):
    """How a generation is built, the deployment's settings filled in where it names none."""

    chunk_max_tokens: int
    chunk_overlap_tokens: int
    model: str

    @classmethod
    def of(cls, settings: Settings, profile: IndexProfile | None) -> IndexSettings:
        """A profile's settings in full."""
        sizes = chunk_sizes(settings, profile)
        model = profile.model if profile is not None and profile.model else None
        return cls(
            chunk_max_tokens=sizes.max_tokens,
            chunk_overlap_tokens=sizes.overlap_tokens,
            model=model or settings.embed_model_name,
        )


class Generation(IndexSettings):
    """A generation of a collection's index: its number (0: the collection's first) and how
    it is built."""

    number: int

    @classmethod
    def numbered(cls, settings: Settings, number: int, profile: IndexProfile | None) -> Generation:
        """Generation `number`, built as `profile` says."""
        return cls(number=number, **IndexSettings.of(settings, profile).model_dump())


class ReindexOut(BaseModel):
    """One reindex of a collection and how far it got."""

    reindex_id: str
    collection: str
    status: ReindexState
    # The same as `status` (both names are kept for clients of either).
    state: ReindexState
    # Where it is followed: GET answers it (and the collection shows it too).
    status_url: str
    # The generation it builds, and the one serving when it started.
    generation: int
    from_generation: int
    settings: IndexSettings
    # Documents with an indexed version; of them, those in the new generation, and those
    # whose job there failed (which fails the reindex).
    documents_total: int
    documents_done: int
    documents_failed: int
    started_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, settings: Settings, reindex: Reindex) -> ReindexOut:
        """The API's shape of a stored reindex."""
        return cls(
            reindex_id=reindex.reindex_id,
            collection=reindex.collection,
            status=reindex.state,
            state=reindex.state,
            status_url=f"/v1/collections/{reindex.collection}/reindex",
            generation=reindex.generation,
            from_generation=reindex.from_generation,
            settings=IndexSettings.of(settings, reindex.profile),
            documents_total=reindex.documents_total,
            documents_done=reindex.documents_done,
            documents_failed=reindex.documents_failed,
            started_at=reindex.created_at,
            finished_at=reindex.finished_at,
        )
