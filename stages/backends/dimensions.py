"""One index name, one vector dimension: what both vector indexes refuse to mix.

Each generation of a collection is built by one model, so its vectors all have that model's
dimension; a batch of another (a stage embedding with a model the generation was not built
with) would fail obscurely on LanceDB's fixed-width column, and on PostgreSQL be stored but
never found by a search, which casts to the query's dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

from contracts.errors import Permanent
from contracts.messages import EmbeddedBatch


def check_dimensions(collection: str, held: int | None, batches: Sequence[EmbeddedBatch]) -> None:
    """Permanent `model_dimensions` unless every vector of `batches` has the dimension the
    index name already holds (`held`; None: nothing yet, and then one of their own)."""
    # An empty batch has no vectors, so no dimension to disagree with.
    seen = {b.vectors.dimensions for b in batches if b.chunks}
    expected = held if held is not None else min(seen, default=None)
    if expected is None or seen <= {expected}:
        return
    others = ", ".join(str(n) for n in sorted(seen - {expected}))
    documents = ", ".join(sorted({b.document_id for b in batches}))
    raise Permanent(
        f"vectors of {others} dimensions for the index {collection!r}, which holds vectors "
        f"of {expected}: a document among {documents} was embedded with another model than "
        "the one this generation of the collection is built with. Reindex the collection to "
        "change its model, or give the embed stage its model back.",
        code="model_dimensions",
    )
