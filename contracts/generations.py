"""Generations of a collection's index: how a reindex builds a new one beside the old.

A collection's chunks live in the index under a name per generation. Generation 0 is the
collection's own name (so an index written before generations existed is generation 0); a
reindex writes generation n under `<collection>.g<n>`, which no collection can be called
(a collection name has no `.`), while search keeps answering from the serving generation.
The switch moves the serving generation in the job store, one row, then drops the old one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from contracts.errors import Permanent
from contracts.messages import COLLECTION_PATTERN, IndexProfile
from contracts.settings import SPECIAL_TOKENS, Settings

_GENERATION_SUFFIX = re.compile(r"\.g([1-9][0-9]*)$")


def index_name(collection: str, generation: int) -> str:
    """The name a generation of a collection has in the vector index."""
    if generation < 0:
        raise ValueError(f"generation {generation} is below 0")
    return collection if generation == 0 else f"{collection}.g{generation}"


def parse_index_name(name: str) -> tuple[str, int]:
    """(collection, generation) of an index name; ValueError if it is none."""
    match = _GENERATION_SUFFIX.search(name)
    collection, generation = (name[: match.start()], int(match.group(1))) if match else (name, 0)
    if not re.fullmatch(COLLECTION_PATTERN, collection):
        raise ValueError(f"{name!r} is not the index name of a collection's generation")
    return collection, generation


@dataclass(frozen=True)
class ChunkSizes:
    """How a generation cuts text: chunks of at most `max_tokens`, overlapping by
    `overlap_tokens` (both in the model's tokens, its special tokens included in the max)."""

    max_tokens: int
    overlap_tokens: int


def chunk_sizes(settings: Settings, profile: IndexProfile | None) -> ChunkSizes:
    """The chunk sizes a profile asks for, the deployment's where it names none; Permanent
    `invalid_profile` if the overlap is over half a chunk (as the settings refuse it)."""
    max_tokens = settings.chunk_max_tokens
    overlap_tokens = settings.chunk_overlap_tokens
    if profile is not None:
        if profile.chunk_max_tokens is not None:
            max_tokens = profile.chunk_max_tokens
        if profile.chunk_overlap_tokens is not None:
            overlap_tokens = profile.chunk_overlap_tokens
    # The bound contracts/settings.py puts on SLUICE_CHUNK_OVERLAP_TOKENS: an overlap of more
    # than half a chunk would make every chunk mostly a copy of the one before.
    capacity = max_tokens - SPECIAL_TOKENS
    if overlap_tokens > capacity // 2:
        raise Permanent(
            f"the index profile's chunk overlap of {overlap_tokens} tokens is too large for "
            f"chunks of {max_tokens} tokens: at most {capacity // 2} (half a chunk, less the "
            "model's 2 special tokens); lower chunk_overlap_tokens or raise chunk_max_tokens",
            code="invalid_profile",
        )
    return ChunkSizes(max_tokens, overlap_tokens)
