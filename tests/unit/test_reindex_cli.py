"""`sluice reindex`: its arguments become the request body it sends."""

from __future__ import annotations

import pytest

from gateway.cli.main import build_parser
from gateway.cli.reindex import settings_of


def test_the_command_line_names_only_what_it_changes() -> None:
    args = build_parser().parse_args(["reindex", "books", "--chunk-max-tokens", "128"])
    assert (args.collection, settings_of(args)) == ("books", {"chunk_max_tokens": 128})
    args = build_parser().parse_args(
        ["reindex", "books", "--model", "/m", "--chunk-overlap-tokens", "0", "--no-follow"]
    )
    assert settings_of(args) == {"chunk_overlap_tokens": 0, "model": "/m"}
    assert args.no_follow and not args.cancel


def test_a_chunk_size_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reindex", "books", "--chunk-max-tokens", "0"])
