"""How fast the gateway answers uploads while embed is saturated, and end-to-end throughput."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

# The document builders live with the tests, imported as the tests import them.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from documents import make_docx, make_html, make_markdown, make_pdf  # noqa: E402

Job = dict[str, Any]
TERMINAL = {"indexed", "failed"}
OUT = REPO / "bench" / "out" / "answer_time.json"
# A plain word list keeps the prose varied (realistic chunk counts) without a download.
_WORD_TEXT = """
river harbour ledger winter copper lantern meadow signal engine orchard basalt thunder
market pigeon quarry velvet cipher granite tunnel beacon saddle furnace compass glacier
timber archive island factory scholar kettle marble ribbon summit vessel canyon falcon
garden bridge mirror parcel needle planet rocket shadow temple violet window anchor
barrel candle desert feather harvest journal ladder mineral nectar oyster pepper quartz
salmon tablet umbrella valley walnut yellow zephyr account budget contract delivery
estimate forecast invoice margin payment revenue schedule supplier transfer warehouse
council village railway station bakery library museum hospital school theatre clinic
measure observe suggest consider replace remember discover explain collect arrange
improve prepare protect reduce require support travel wonder borrow carry deliver
gather inspect mention notice recover repair return select follow increase balance
quiet heavy bright narrow ancient careful distant gentle honest hollow modern patient
rapid silent steady sudden tender vivid wooden frozen golden humble loyal rural formal
often rarely slowly almost nearly quite always seldom soon later early perhaps indeed
the the the a a of of to to and and in in with from for by on at over under after
"""
WORDS = _WORD_TEXT.split()


def sentence(rng: random.Random) -> str:
    """One sentence of 8-20 words drawn from the word list."""
    words = rng.choices(WORDS, k=rng.randint(8, 20))
    if len(words) > 10 and rng.random() < 0.4:
        words[rng.randint(3, len(words) - 4)] += ","
    return " ".join(words).capitalize() + "."


def paragraph(rng: random.Random, words: int) -> str:
    """Sentences until at least `words` words."""
    out: list[str] = []
    while sum(s.count(" ") + 1 for s in out) < words:
        out.append(sentence(rng))
    return " ".join(out)


def big_document(i: int, pages: int) -> tuple[str, bytes]:
    """A multi-page PDF of about 300 words a page, unique to `i`."""
    rng = random.Random(f"backlog-{i}")
    return f"backlog-{i:03d}.pdf", make_pdf([paragraph(rng, 300) for _ in range(pages)])


def small_document(i: int) -> tuple[str, bytes]:
    """A short document of 150-400 words, rotating through the supported formats."""
    rng = random.Random(f"small-{i}")
    paras = [paragraph(rng, rng.randint(40, 100)) for _ in range(rng.randint(2, 4))]
    title = f"Note {i} on the {rng.choice(WORDS)}"
    kind = i % 4
    if kind == 0:
        return f"small-{i:03d}.pdf", make_pdf(paras)
    if kind == 1:
        sections = {f"Part {n}": p for n, p in enumerate(paras, 1)}
        return f"small-{i:03d}.md", make_markdown(title, sections)
    if kind == 2:
        table = [["Item", "Count"], [rng.choice(WORDS), str(rng.randint(1, 999))]]
        return f"small-{i:03d}.docx", make_docx(paras, table, heading=title)
    return f"small-{i:03d}.html", make_html(title, paras)


def upload(client: httpx.Client, collection: str, name: str, data: bytes) -> httpx.Response:
    """POST one document to the collection."""
    return client.post(
        "/v1/documents", files={"file": (name, data)}, data={"collection": collection}
    )


def jobs_in(client: httpx.Client, collection: str, status: str | None = None) -> Iterator[Job]:
    """Every job in the collection (optionally with one status), following the cursor."""
    params: dict[str, str | int] = {"collection": collection, "limit": 500}
    if status is not None:
        params["status"] = status
    while True:
        page = client.get("/v1/jobs", params=params).raise_for_status().json()
        yield from page["jobs"]
        if not page["next_cursor"]:
            return
        params["cursor"] = page["next_cursor"]


def wait_until(check: Callable[[], bool], deadline_s: float, what: str) -> None:
    """Poll `check` every second until true; fail loudly at the deadline."""
    end = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > end:
            sys.exit(f"gave up after {deadline_s:.0f} s waiting for {what}")
        time.sleep(1.0)


def when(stamp: str | None) -> datetime | None:
    """An RFC 3339 time from the API, or None."""
    return datetime.fromisoformat(stamp) if stamp else None


def stage_end(job: Job, stage: str) -> datetime | None:
    """When a stage finished a job, if it did."""
    return when((job["stages"].get(stage) or {}).get("finished_at"))


def main() -> None:
    """Run phases A (saturate embed), B (time uploads), C (drain) and report."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", required=True)
    ap.add_argument("--uploads", type=int, default=200)
    ap.add_argument("--backlog-docs", type=int, default=40)
    ap.add_argument("--backlog-pages", type=int, default=20)
    # A fresh collection per run, so identical (seeded) bytes never come back as duplicates.
    ap.add_argument("--collection", default=f"bench-{int(time.time())}")
    ap.add_argument("--deadline-s", type=float, default=1800.0)
    args = ap.parse_args()
    coll: str = args.collection

    # Built before any timing so document generation never counts against the gateway.
    backlog = [big_document(i, args.backlog_pages) for i in range(args.backlog_docs)]
    smalls = [small_document(i) for i in range(args.uploads)]
    print(f"collection {coll}: {len(backlog)} backlog docs, {len(smalls)} small docs built")

    with httpx.Client(base_url=args.url, timeout=120.0) as client:
        started = datetime.now(UTC)
        backlog_ids: list[str] = []
        for name, data in backlog:
            response = upload(client, coll, name, data)
            if response.status_code != 202:
                sys.exit(f"backlog upload {name}: {response.status_code} {response.text}")
            backlog_ids.append(response.json()["job_id"])
        wait_until(
            lambda: any(True for _ in jobs_in(client, coll, "embedding")), 600, "embed to start"
        )
        print("phase A: embed busy")

        answer_ms: list[float] = []
        statuses: dict[int, int] = {}
        small_ids: list[str] = []
        for name, data in smalls:
            t0 = time.perf_counter()
            response = upload(client, coll, name, data)
            answer_ms.append((time.perf_counter() - t0) * 1000)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 202:
                small_ids.append(response.json()["job_id"])
        b_ended = datetime.now(UTC)
        after_b = list(jobs_in(client, coll))
        in_flight = sum(1 for j in after_b if j["status"] not in TERMINAL)
        backlog_set = set(backlog_ids)
        backlog_in_flight = sum(
            1 for j in after_b if j["job_id"] in backlog_set and j["status"] not in TERMINAL
        )
        embedding_now = sum(1 for j in after_b if j["status"] == "embedding")
        print(f"phase B: {len(answer_ms)} uploads timed, {in_flight} jobs in flight")

        ours = backlog_set | set(small_ids)
        final: dict[str, Job] = {}

        def all_done() -> bool:
            final.update((j["job_id"], j) for j in jobs_in(client, coll) if j["job_id"] in ours)
            return len(final) == len(ours) and all(j["status"] in TERMINAL for j in final.values())

        wait_until(all_done, args.deadline_s, "every job to finish")

    failed = [j for j in final.values() if j["status"] == "failed"]
    ends = [e for j in final.values() if (e := stage_end(j, "index")) is not None]
    wall_s = (max(ends) - started).total_seconds()
    chunks = sum(j["progress"]["chunks_total"] or 0 for j in final.values())
    backlog_chunks = sum(final[i]["progress"]["chunks_total"] or 0 for i in backlog_ids)
    last_backlog_embed = max(
        (e for i in backlog_ids if (e := stage_end(final[i], "embed")) is not None), default=None
    )
    cuts = statistics.quantiles(answer_ms, n=100, method="inclusive")
    figures: dict[str, Any] = {
        "collection": coll,
        "uploads_timed": len(answer_ms),
        "answer_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "answer_ms_p50": round(cuts[49], 1),
        "answer_ms_p90": round(cuts[89], 1),
        "answer_ms_p99": round(cuts[98], 1),
        "answer_ms_max": round(max(answer_ms), 1),
        "jobs_in_flight_after_b": in_flight,
        "backlog_in_flight_after_b": backlog_in_flight,
        "jobs_embedding_after_b": embedding_now,
        # Embed stayed busy through phase B only if the backlog was still embedding after it.
        "embed_busy_through_b": last_backlog_embed is not None and last_backlog_embed > b_ended,
        "documents": len(final),
        "backlog_documents": len(backlog_ids),
        "chunks_total": chunks,
        "backlog_chunks": backlog_chunks,
        "failed": len(failed),
        "wall_s": round(wall_s, 1),
        "chunks_per_s": round(chunks / wall_s, 2),
        "docs_per_s": round(len(final) / wall_s, 3),
    }
    for job in failed:
        print(f"failed: {job['filename']} {job['error']}")
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
