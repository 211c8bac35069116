"""Generations of a collection's index: how a reindex builds a new one beside the old.

A collection's chunks live in the index under a name per generation. Generation 0 is the
collection's own name (so an index written before generations existed is generation 0); a
reindex writes generation n under `<collection>.g<n>`, which no collection can be called
(a collection name has no `.`), while search keeps answering from the serving generation.
The switch moves the serving generation in the job store, one row, then drops the old one.
"""

from __future__ import annotations

import re

from contracts.messages import COLLECTION_PATTERN

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
