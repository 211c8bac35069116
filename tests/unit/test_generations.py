"""Index names of a collection's generations: generation 0 is the collection itself."""

from __future__ import annotations

import pytest

from contracts.generations import index_name, parse_index_name


def test_generation_zero_is_the_collection_itself() -> None:
    assert index_name("papers", 0) == "papers"
    assert parse_index_name("papers") == ("papers", 0)


def test_a_later_generation_has_a_name_no_collection_can_have() -> None:
    assert index_name("papers", 3) == "papers.g3"
    assert parse_index_name("papers.g3") == ("papers", 3)


@pytest.mark.parametrize("name", ["papers.g0", "Papers", "papers.x", ".g1"])
def test_what_is_no_generations_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError):
        parse_index_name(name)
