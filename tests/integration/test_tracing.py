"""One upload is one trace: the gateway's request, then each stage's consumer span under the
publish that fed it, exported by every process over OTLP/HTTP to a fake receiver."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from broker import BrokerHandle
from documents import make_pdf
from fakes.otlp_receiver import FakeOtlpReceiver, ReceivedSpan
from pipeline import Pipeline, start_pipeline, stop_pipeline, wait_for_job

from contracts import routing
from contracts.pipeline import DEFAULT_STAGE_NAMES as STAGES

# Small chunk batches, so one document fans out into several embed and index messages.
CHUNKS_PER_MESSAGE = 4
INPUT_KEYS = {
    "parse": routing.DOC_UPLOADED,
    "chunk": routing.DOC_PARSED,
    "embed": routing.DOC_CHUNKED,
    "index": routing.DOC_EMBEDDED,
}
# Messaging semantic conventions have renamed these over time; either name is accepted.
DESTINATION_KEYS = ("messaging.destination.name", "messaging.destination")
ROUTING_KEY_KEYS = ("messaging.rabbitmq.destination.routing_key", "messaging.rabbitmq.routing_key")
STAGE_ATTRIBUTES = {
    "parse": "sluice.pages",
    "chunk": "sluice.chunks",
    "embed": "sluice.batch_size",
    "index": "sluice.batch_size",
}
PAGES = [
    f"Page {n} of the harbour survey. "
    + " ".join(
        f"Tide gauge {n}-{k} recorded {k * 7 % 13} centimetres of surge near pier {k}."
        for k in range(25)
    )
    for n in range(1, 5)
]


@pytest.fixture(scope="module")
def receiver() -> Iterator[FakeOtlpReceiver]:
    """Where every process of the traced pipeline exports its spans."""
    with FakeOtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def traced(
    broker: BrokerHandle, receiver: FakeOtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """A pipeline whose processes export traces to the receiver, in batches every 200 ms."""
    running = start_pipeline(
        broker,
        tmp_path_factory.mktemp("traced"),
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="200",
        SLUICE_CHUNKS_PER_MESSAGE=str(CHUNKS_PER_MESSAGE),
    )
    try:
        yield running
    finally:
        stop_pipeline(running)


@pytest.fixture
async def api(traced: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the traced pipeline's gateway."""
    async with httpx.AsyncClient(base_url=traced.url, timeout=30) as client:
        yield client


def stage_consumers(spans: list[ReceivedSpan], stage: str, job_id: str) -> list[ReceivedSpan]:
    """The CONSUMER spans of one stage's process doing this job's work."""
    return [
        s
        for s in spans
        if s.service == f"sluice-{stage}"
        and s.kind == "CONSUMER"
        and s.attributes.get("sluice.job_id") == job_id
    ]


def is_upload_request(span: ReceivedSpan) -> bool:
    """The gateway's HTTP server span for `POST /v1/documents`."""
    return (
        span.service == "sluice-gateway"
        and span.kind == "SERVER"
        and (
            span.attributes.get("http.route") == "/v1/documents"
            or span.name == "POST /v1/documents"
        )
    )


def first_of(attributes: dict[str, object], keys: tuple[str, ...]) -> object:
    """The value of the first of `keys` the span has (None if none)."""
    return next((attributes[k] for k in keys if k in attributes), None)


async def test_one_upload_is_one_trace_from_request_to_index(
    api: httpx.AsyncClient, traced: Pipeline, receiver: FakeOtlpReceiver
) -> None:
    answer = await api.post(
        "/v1/documents",
        files={"file": ("survey.pdf", make_pdf(PAGES))},
        data={"collection": "traced"},
    )
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    job = await wait_for_job(api, job_id)
    assert job["status"] == "indexed", job
    chunks_total = job["progress"]["chunks_total"]
    batches = math.ceil(chunks_total / CHUNKS_PER_MESSAGE)

    def all_stages_arrived(spans: list[ReceivedSpan]) -> bool:
        return all(len(stage_consumers(spans, s, job_id)) >= 1 for s in STAGES) and any(
            is_upload_request(s) for s in spans
        )

    arrived = receiver.wait_for(all_stages_arrived, timeout_s=60)
    assert arrived, (
        f"spans of job {job_id} from all four stages and the gateway did not arrive in 60 s: "
        f"{receiver.summary()}\n{traced.logs()}"
    )
    traces_of_job = {
        s.trace_id for s in receiver.spans() if s.attributes.get("sluice.job_id") == job_id
    }
    assert len(traces_of_job) == 1, f"job {job_id} is spread over traces {traces_of_job}"
    [trace_id] = traces_of_job

    def tree_complete(spans: list[ReceivedSpan]) -> bool:
        ids = {s.span_id for s in spans if s.trace_id == trace_id}
        in_trace = [s for s in spans if s.trace_id == trace_id]
        # Parents end after their children, so they may arrive a batch later.
        return all(s.parent_span_id is None or s.parent_span_id in ids for s in in_trace) and all(
            len(stage_consumers(in_trace, s, job_id)) >= (batches if s in ("embed", "index") else 1)
            for s in STAGES
        )

    # Not asserted here: the assertions below say precisely what is missing if it never is.
    receiver.wait_for(tree_complete, timeout_s=15)
    spans = receiver.traces()[trace_id]
    tree = receiver.render_tree(trace_id)
    print(f"\ntrace {trace_id} of job {job_id}:\n{tree}")
    by_id = {s.span_id: s for s in spans}

    roots = [s for s in spans if s.parent_span_id is None or s.parent_span_id not in by_id]
    assert len(roots) == 1 and is_upload_request(roots[0]), f"roots {roots}\n{tree}"
    assert job["trace_id"] == trace_id
    fetched = await api.get(f"/v1/jobs/{job_id}")
    assert fetched.json()["trace_id"] == trace_id

    for span in (s for s in spans if s.kind == "CONSUMER"):
        parent = by_id.get(span.parent_span_id or "")
        assert parent is not None, f"{span} has no parent in the trace\n{tree}"
        assert parent.kind == "PRODUCER", f"{span} is under {parent}, not a publish\n{tree}"

    for stage in STAGES:
        consumers = stage_consumers(spans, stage, job_id)
        expected = batches if stage in ("embed", "index") else 1
        assert len(consumers) == expected, (stage, consumers, tree)
        upstream = (
            "sluice-gateway" if stage == "parse" else f"sluice-{STAGES[STAGES.index(stage) - 1]}"
        )
        for span in consumers:
            attributes = span.attributes
            assert by_id[span.parent_span_id or ""].service == upstream, (span, tree)
            assert attributes.get("messaging.system") == "rabbitmq", span
            destination = first_of(attributes, DESTINATION_KEYS)
            assert isinstance(destination, str) and traced.namespace in destination, span
            assert first_of(attributes, ROUTING_KEY_KEYS) == INPUT_KEYS[stage], span
            assert attributes.get("sluice.document_id") == job["document_id"], span
            assert attributes.get("sluice.collection") == "traced", span
            assert attributes.get("sluice.attempt") == 1, span
            assert span.status_code != "ERROR", span
            assert STAGE_ATTRIBUTES[stage] in attributes, span
    [parse] = stage_consumers(spans, "parse", job_id)
    assert parse.attributes["sluice.pages"] == job["progress"]["pages"] == len(PAGES)
    [chunk] = stage_consumers(spans, "chunk", job_id)
    assert chunk.attributes["sluice.chunks"] == chunks_total
    for stage in ("embed", "index"):
        sizes = [s.attributes["sluice.batch_size"] for s in stage_consumers(spans, stage, job_id)]
        assert sum(sizes) == chunks_total, (stage, sizes)
        assert all(1 <= n <= CHUNKS_PER_MESSAGE for n in sizes), (stage, sizes)


async def test_a_failure_marks_its_span_and_a_replay_links_to_the_original_trace(
    traced: Pipeline, receiver: FakeOtlpReceiver, api: httpx.AsyncClient
) -> None:
    # A plain file where the collection's table belongs makes every index write fail.
    blocker = traced.data_dir / "index" / "chunks_traced-failure.lance"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")
    answer = await api.post(
        "/v1/documents",
        files={"file": ("fails.pdf", make_pdf(["The index will refuse this page."]))},
        data={"collection": "traced-failure"},
    )
    job_id = answer.json()["job_id"]
    failed = await wait_for_job(api, job_id)
    assert failed["status"] == "failed", failed
    original_trace = failed["trace_id"]

    def index_errors(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in stage_consumers(spans, "index", job_id) if s.status_code == "ERROR"]

    assert receiver.wait_for(lambda spans: len(index_errors(spans)) >= 2, timeout_s=60), (
        receiver.summary()
    )
    assert all(s.trace_id == original_trace for s in index_errors(receiver.spans()))

    blocker.unlink()
    assert (await api.post(f"/v1/jobs/{job_id}/retry")).status_code == 202
    assert (await wait_for_job(api, job_id))["status"] == "indexed"

    def replays(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [
            s
            for s in spans
            if s.name == "replay index" and s.attributes.get("sluice.job_id") == job_id
        ]

    assert receiver.wait_for(lambda spans: bool(replays(spans)), timeout_s=60), receiver.summary()
    (replay,) = replays(receiver.spans())
    assert replay.trace_id != original_trace, "a replay starts in the replaying request's trace"
    assert [trace_id for trace_id, _ in replay.links] == [original_trace]
