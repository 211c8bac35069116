"""The optional enrich stage in the real pipeline, on a real broker: keywords reach search,
the language reaches the job, and a YAKE failure dead-letters the document with a reason.

One pipeline for the module. Its enrich process is `tests/fakes/failing_enrich.py`: the real
`sluice stage enrich` except that YAKE breaks on a marker word, so only the document holding
the marker takes the failure path.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker import BrokerHandle
from documents import make_html, make_markdown
from fakes.failing_enrich import FAIL_MARKER
from pipeline import Pipeline, launch, stop_pipeline, wait_for_job

STAGES = "parse,chunk,enrich,embed,index"
COLLECTION = "enriched"
TERNS = {
    "Breeding": (
        "Arctic terns breed in colonies around the Arctic Circle, on shingle beaches and "
        "small islands, and defend their nests fiercely against gulls, foxes and people."
    ),
    "Migration": (
        "Each autumn the terns fly south to the Antarctic pack ice. Researchers who fitted "
        "the birds with light geolocators found that a single tern covers about seventy "
        "thousand kilometres a year, the longest migration known in the animal kingdom."
    ),
}
LIGHTHOUSE = [
    "The lighthouse keeper logged wind speed and barometric pressure every morning.",
    "Before dusk he climbed the spiral staircase to trim the wick and polish the Fresnel "
    "lens, whose beam reached fishing boats many nautical miles offshore.",
]
GERMAN = {
    "Brot": (
        "Ein Sauerteigbrot braucht eine lange, kalte Gare, damit sich sein Geschmack "
        "entwickelt. Der Bäcker füttert den Sauerteig zweimal am Tag mit Mehl und Wasser "
        "und backt das Brot am nächsten Morgen im heißen Steinofen."
    )
}


@pytest.fixture(scope="module")
def pipeline(broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A Sluice with enrich between chunk and embed; the enrich process breaks on the marker."""
    failing_enrich = [
        sys.executable,
        str(Path(__file__).parents[1] / "fakes" / "failing_enrich.py"),
    ]
    running = launch(
        broker,
        tmp_path_factory.mktemp("enrich"),
        {"SLUICE_STAGES": STAGES},
        commands={"enrich": failing_enrich},
    )
    try:
        yield running
    finally:
        stop_pipeline(running)


async def upload(api: httpx.AsyncClient, name: str, data: bytes) -> str:
    """POST one file into the module's collection; returns its job id."""
    answer = await api.post(
        "/v1/documents", files={"file": (name, data)}, data={"collection": COLLECTION}
    )
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["job_id"]
    return job_id


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


async def test_keywords_reach_search_and_the_language_reaches_the_job(
    api: httpx.AsyncClient,
) -> None:
    job_ids = await asyncio.gather(
        upload(api, "terns.md", make_markdown("Arctic terns", TERNS)),
        upload(api, "lighthouse.html", make_html("The keeper", LIGHTHOUSE)),
        upload(api, "brot.md", make_markdown("Sauerteig", GERMAN)),
    )
    jobs = await asyncio.gather(*(wait_for_job(api, job_id) for job_id in job_ids))
    for job in jobs:
        assert job["status"] == "indexed", job
        assert job["progress"]["chunks_indexed"] == job["progress"]["chunks_total"] >= 1
        assert set(job["stages"]) == {"parse", "chunk", "enrich", "embed", "index"}, job
        timing = job["stages"]["enrich"]
        assert timing["started_at"] <= timing["finished_at"], timing
        assert timing["attempts"] == 1
    assert [job["language"] for job in jobs] == ["en", "en", "de"]

    results: list[dict[str, Any]] = []
    for query in ("how far do terns migrate", "lighthouse lens", "Sauerteig Brot backen"):
        answer = await api.get("/v1/search", params={"q": query, "collection": COLLECTION})
        assert answer.status_code == 200, answer.text
        results += answer.json()["results"]
    assert {hit["filename"] for hit in results} == {"terns.md", "lighthouse.html", "brot.md"}
    for hit in results:
        assert hit["keywords"], hit
        for phrase in hit["keywords"]:
            assert words(phrase) <= words(hit["text"]), (phrase, hit["text"])
    terns = next(hit for hit in results if hit["filename"] == "terns.md")
    assert any("tern" in phrase.lower() for phrase in terns["keywords"]), terns


async def test_a_yake_failure_fails_the_job_and_dead_letters_it_with_a_reason(
    api: httpx.AsyncClient,
) -> None:
    broken = make_markdown(
        "Field notes", {"Day one": f"The word {FAIL_MARKER} appears in this field note."}
    )
    healthy = make_markdown("Orchards", {"Apples": "Old orchards keep rare apple varieties."})
    failed_id, healthy_id = await asyncio.gather(
        upload(api, "notes.md", broken), upload(api, "orchards.md", healthy)
    )
    failed, indexed = await asyncio.gather(
        wait_for_job(api, failed_id), wait_for_job(api, healthy_id)
    )
    assert indexed["status"] == "indexed", indexed
    assert failed["status"] == "failed", failed
    error = failed["error"]
    assert (error["stage"], error["code"], error["retryable"]) == (
        "enrich",
        "keyword_extraction_failed",
        False,
    )
    assert "notes.md" in error["message"] and "YAKE" in error["message"], error
    assert "candidate graph has a cycle" in error["message"], error
    assert "embed" not in failed["stages"] and "index" not in failed["stages"], failed

    answer = await api.get("/v1/dead-letters")
    assert answer.status_code == 200, answer.text
    letters = [lt for lt in answer.json()["dead_letters"] if lt["job_id"] == failed_id]
    assert len(letters) == 1, answer.json()
    (letter,) = letters
    assert (letter["stage"], letter["code"]) == ("enrich", "keyword_extraction_failed")
    assert "candidate graph has a cycle" in letter["reason"], letter
