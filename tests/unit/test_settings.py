"""Settings that cannot run fail `sluice up` at once, naming the variable; per-stage settings
resolve in one documented order; the topology follows the pipeline and each stage's policy.

The `sluice up` cases run the real command as a process, with no broker anywhere: a setting
the checks miss would show here as a supervisor that starts the stack instead of exiting 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from contracts import routing
from contracts.pipeline import BUILTIN, PipelineError
from contracts.settings import Settings
from contracts.topology import QueueArguments, topology

REPO = Path(__file__).resolve().parents[2]
# `sluice up` checks before it starts anything; a second or so is Python's start-up.
UP_DEADLINE_S = 15.0
# Port 9 (discard) on loopback: if the checks let a bad setting through, nothing connects.
NOWHERE_AMQP = "amqp://nobody:nothing@127.0.0.1:9/"

SetEnv = Callable[..., None]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> SetEnv:
    """A clean slate of `SLUICE_*` variables; returns a function that sets some."""
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)

    def set_env(**variables: str) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return set_env


def _sluice_up(tmp_path: Path, variables: dict[str, str]) -> tuple[int, str, str, float]:
    """Run `sluice up` with these variables; (exit code, stdout, stderr, seconds taken)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    data_dir = tmp_path / "data"
    process_env = {
        **base,
        "SLUICE_AMQP_URL": NOWHERE_AMQP,
        "SLUICE_DATA_DIR": str(data_dir),
        **variables,
    }
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", "up"],
        cwd=tmp_path,
        env=process_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=UP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        # It got past the checks and is running the stack: SIGTERM lets the supervisor stop
        # its children (each in its own session), so none outlives the test.
        process.terminate()
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        pytest.fail(f"sluice up accepted {variables} and started the stack:\n{out}\n{err}")
    elapsed = time.monotonic() - started
    assert not data_dir.exists(), "sluice up touched the data directory before refusing"
    return process.returncode, out, err, elapsed


BAD_SETTINGS = {
    "retry-tiers-empty": ({"SLUICE_RETRY_DELAYS_S": "[]"}, ["SLUICE_RETRY_DELAYS_S"]),
    "stage-retry-tiers-empty": (
        {"SLUICE_EMBED_RETRY_DELAYS_S": "[]"},
        ["SLUICE_EMBED_RETRY_DELAYS_S"],
    ),
    "overlap-half-a-chunk": (
        {"SLUICE_CHUNK_OVERLAP_TOKENS": "128"},
        ["SLUICE_CHUNK_OVERLAP_TOKENS", "SLUICE_CHUNK_MAX_TOKENS"],
    ),
    "overlap-half-a-small-chunk": (
        {"SLUICE_CHUNK_MAX_TOKENS": "64", "SLUICE_CHUNK_OVERLAP_TOKENS": "32"},
        ["SLUICE_CHUNK_OVERLAP_TOKENS", "SLUICE_CHUNK_MAX_TOKENS"],
    ),
    "unknown-stage": (
        {"SLUICE_STAGES": "parse,chunk,summarise,embed,index"},
        ["SLUICE_STAGES", "summarise"],
    ),
    "stage-twice": ({"SLUICE_STAGES": "parse,chunk,chunk,embed,index"}, ["SLUICE_STAGES"]),
    "plug-in-does-not-import": (
        {
            "SLUICE_STAGE_MODULES": "extra=nowhere_at_all.extra",
            "SLUICE_STAGES": "parse,chunk,extra,embed,index",
        },
        ["SLUICE_STAGE_MODULES", "nowhere_at_all.extra"],
    ),
    "plug-in-entry-malformed": ({"SLUICE_STAGE_MODULES": "extra"}, ["SLUICE_STAGE_MODULES"]),
    "prefetch-below-concurrency": (
        {"SLUICE_EMBED_PREFETCH": "2", "SLUICE_EMBED_CONCURRENCY": "8"},
        ["SLUICE_EMBED_PREFETCH=2", "SLUICE_EMBED_CONCURRENCY=8"],
    ),
    "not-ending-in-index": ({"SLUICE_STAGES": "parse,chunk,embed"}, ["SLUICE_STAGES", "index"]),
    "not-starting-with-parse": (
        {"SLUICE_STAGES": "chunk,embed,index"},
        ["SLUICE_STAGES", "parse"],
    ),
    "wrong-order": ({"SLUICE_STAGES": "parse,embed,chunk,index"}, ["SLUICE_STAGES", "reorder"]),
}


@pytest.mark.parametrize(("variables", "named"), BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_sluice_up_refuses_bad_settings_at_once(
    tmp_path: Path, variables: dict[str, str], named: list[str]
) -> None:
    """Exit 2 within seconds, nothing started, and stderr names what to change."""
    code, out, err, elapsed = _sluice_up(tmp_path, variables)
    assert code == 2, (out, err)
    assert err.startswith("sluice up: error: "), err
    for text in named:
        assert text in err, err
    assert "started" not in out + err
    assert elapsed < UP_DEADLINE_S


def test_a_plug_in_module_that_does_not_import_is_refused_even_when_unused(env: SetEnv) -> None:
    """A typo in SLUICE_STAGE_MODULES is caught the day it is written, not the day it is used."""
    env(SLUICE_STAGE_MODULES="extra=nowhere_at_all.extra")
    with pytest.raises(PipelineError, match="SLUICE_STAGE_MODULES"):
        Settings().check()


# ---- Settings.stage(name): per-stage variable, then global, then the stage's, then Sluice's


def test_a_stage_variable_beats_the_global_one(env: SetEnv) -> None:
    """`SLUICE_EMBED_*` sets embed alone; every other stage keeps the global value."""
    env(
        SLUICE_MAX_ATTEMPTS="3",
        SLUICE_EMBED_MAX_ATTEMPTS="9",
        SLUICE_RETRY_DELAYS_S="[5]",
        SLUICE_EMBED_RETRY_DELAYS_S="[2,30]",
        SLUICE_DELIVERY_LIMIT="7",
        SLUICE_EMBED_DELIVERY_LIMIT="2",
        SLUICE_TRANSIENT_RETRIES="1",
        # Zero is a value, not "unset".
        SLUICE_EMBED_TRANSIENT_RETRIES="0",
    )
    settings = Settings()
    embed, parse = settings.stage("embed"), settings.stage("parse")
    assert (embed.max_attempts, embed.retry_delays_s) == (9, (2, 30))
    assert (embed.delivery_limit, embed.transient_retries) == (2, 0)
    assert (parse.max_attempts, parse.retry_delays_s) == (3, (5,))
    assert (parse.delivery_limit, parse.transient_retries) == (7, 1)


def test_stage_variables_beat_the_stage_declaration(env: SetEnv) -> None:
    """Prefetch, concurrency and metrics port come from the spec unless a variable says."""
    env(SLUICE_PARSE_PREFETCH="6", SLUICE_PARSE_CONCURRENCY="3", SLUICE_PARSE_METRICS_PORT="0")
    settings = Settings()
    parse = settings.stage("parse")
    assert (parse.prefetch, parse.concurrency, parse.metrics_port) == (6, 3, 0)
    chunk, spec = settings.stage("chunk"), BUILTIN["chunk"]
    assert (chunk.prefetch, chunk.concurrency, chunk.metrics_port) == (
        spec.prefetch,
        spec.concurrency,
        spec.metrics_port,
    )


PLUG_IN = '''
"""A plug-in stage that declares its own retry policy and throttle."""

from contracts.messages import ChunkBatch, Message
from contracts.pipeline import StageSpec
from contracts.settings import Settings
from stages.stage import Stage


async def startup(settings: Settings) -> None:
    return None


async def handle(msg: ChunkBatch, ctx: None) -> list[Message]:
    return [msg]


STAGE = Stage(
    spec=StageSpec(
        "tuned",
        ChunkBatch,
        ChunkBatch,
        prefetch=3,
        concurrency=3,
        retry_delays_s=(7, 70),
        max_attempts=9,
    ),
    startup=startup,
    handle=handle,
)
'''


@pytest.fixture
def tuned_stage(env: SetEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline with the `tuned` plug-in between chunk and embed (a fresh module name)."""
    module = f"tuned_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(PLUG_IN))
    monkeypatch.syspath_prepend(str(tmp_path))
    env(SLUICE_STAGE_MODULES=f"tuned={module}", SLUICE_STAGES="parse,chunk,tuned,embed,index")


@pytest.mark.usefixtures("tuned_stage")
def test_a_global_variable_beats_the_stage_declaration(env: SetEnv) -> None:
    """The stage's declared policy beats Sluice's defaults, and an operator's global beats it."""
    declared = Settings()
    assert declared.check().names == ("parse", "chunk", "tuned", "embed", "index")
    tuned = declared.stage("tuned")
    assert (tuned.retry_delays_s, tuned.max_attempts) == ((7, 70), 9)
    assert (tuned.prefetch, tuned.concurrency) == (3, 3)
    embed = declared.stage("embed")
    assert (embed.retry_delays_s, embed.max_attempts) == ((1, 10, 60), 5)

    # Set explicitly, even to Sluice's own default value, the global wins over the stage's.
    env(SLUICE_RETRY_DELAYS_S="[4]", SLUICE_MAX_ATTEMPTS="5")
    overridden = Settings().stage("tuned")
    assert (overridden.retry_delays_s, overridden.max_attempts) == ((4,), 5)

    env(SLUICE_TUNED_RETRY_DELAYS_S="[8]")
    assert Settings().stage("tuned").retry_delays_s == (8,)


def test_prefetch_alone_moves_concurrency_down(env: SetEnv) -> None:
    """A prefetch below the declared concurrency takes the concurrency with it; above, not."""
    env(SLUICE_EMBED_PREFETCH="4")
    embed = Settings().stage("embed")
    assert (embed.prefetch, embed.concurrency) == (4, 4)
    env(SLUICE_EMBED_PREFETCH="64")
    embed = Settings().stage("embed")
    assert (embed.prefetch, embed.concurrency) == (64, BUILTIN["embed"].concurrency)


def test_concurrency_alone_moves_prefetch_up(env: SetEnv) -> None:
    """A concurrency above the declared prefetch raises the prefetch, so the pair checks."""
    env(SLUICE_PARSE_CONCURRENCY="6")
    settings = Settings()
    parse = settings.stage("parse")
    assert (parse.prefetch, parse.concurrency) == (6, 6)
    settings.check()


def test_the_largest_overlap_allowed_passes(env: SetEnv) -> None:
    """Half a chunk less the special tokens is allowed; one more is not (see above)."""
    env(SLUICE_CHUNK_MAX_TOKENS="256", SLUICE_CHUNK_OVERLAP_TOKENS="127")
    Settings().check()


# ---- contracts.topology: queues and bindings from the pipeline and each stage's policy


def test_with_enrich_chunk_feeds_enrich_and_enrich_feeds_embed(env: SetEnv) -> None:
    """Each stage publishes with the next one's input key, and only that queue binds it."""
    env(SLUICE_STAGES="parse,chunk,enrich,embed,index")
    settings = Settings()
    pipeline = settings.check()
    assert pipeline.output_key("chunk") == pipeline.spec("enrich").input_key
    assert pipeline.output_key("enrich") == pipeline.spec("embed").input_key
    assert pipeline.output_key("index") is None
    assert pipeline.statuses == (
        "queued",
        "parsing",
        "chunking",
        "enriching",
        "embedding",
        "indexing",
        "indexed",
        "failed",
    )

    topo = topology(settings)
    ns = settings.namespace
    main = routing.exchange(ns)
    bound = {key: q.name for q in topo.queues if q.exchange == main for key in q.binding_keys}
    assert bound[pipeline.output_key("chunk") or ""] == routing.stage_queue(ns, "enrich")
    assert bound[pipeline.output_key("enrich") or ""] == routing.stage_queue(ns, "embed")
    assert bound[routing.DOC_UPLOADED] == routing.stage_queue(ns, "parse")
    assert bound[routing.JOB_EVENTS] == routing.tracker_queue(ns)
    names = [q.name for q in topo.queues]
    assert len(names) == len(set(names))


def test_without_enrich_chunk_feeds_embed_and_no_enrich_queue_exists(env: SetEnv) -> None:
    """The default pipeline declares nothing for the optional stage."""
    settings = Settings()
    pipeline = settings.check()
    assert pipeline.output_key("chunk") == pipeline.spec("embed").input_key == routing.DOC_CHUNKED
    assert not [q.name for q in topology(settings).queues if ".enrich" in q.name]


def test_retry_tiers_follow_each_stage_own_delays(env: SetEnv) -> None:
    """`SLUICE_<STAGE>_RETRY_DELAYS_S` gives that stage its tiers; the rest take the global."""
    env(SLUICE_NAMESPACE="tiers", SLUICE_RETRY_DELAYS_S="[5]", SLUICE_EMBED_RETRY_DELAYS_S="[2,30]")
    topo = topology(Settings())
    retry = {q.name for q in topo.queues if ".retry." in q.name}
    # Every lane has its own tiers; the webhook side stage has tiers too (the operator's
    # deployment-wide delays beat its own defaults).
    assert retry == {
        routing.retry_queue("tiers", stage, delay_s, lane)
        for lane in routing.LANES
        for stage, delay_s in [
            ("parse", 5),
            ("chunk", 5),
            ("embed", 2),
            ("embed", 30),
            ("index", 5),
            ("webhook", 5),
        ]
    }
    for lane in routing.LANES:
        tier = topo.queue(routing.retry_queue("tiers", "embed", 30, lane))
        # No binding: a tier is reached by the runtime's publish and left by its TTL, back
        # to its own lane's queue.
        assert (tier.exchange, tier.binding_keys) == (None, ())
        assert tier.arguments.as_amqp() == {
            "x-message-ttl": 30_000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": routing.stage_queue("tiers", "embed", lane),
        }


def test_stage_queue_arguments_use_rabbitmq_names(env: SetEnv) -> None:
    """Typed fields become the `x-` arguments RabbitMQ reads, with per-stage delivery limits."""
    env(SLUICE_DELIVERY_LIMIT="7", SLUICE_INDEX_DELIVERY_LIMIT="3", SLUICE_QUEUE_MAX_LENGTH="500")
    settings = Settings()
    topo = topology(settings)
    ns = settings.namespace

    def stage_arguments(delivery_limit: int) -> dict[str, str | int]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": routing.dead_letter_exchange(ns),
            "x-max-length": 500,
            "x-overflow": "reject-publish",
        }

    assert topo.queue(routing.stage_queue(ns, "index")).arguments.as_amqp() == stage_arguments(3)
    assert topo.queue(routing.stage_queue(ns, "parse")).arguments.as_amqp() == stage_arguments(7)
    dead_letters = topo.queue(routing.dead_letter_queue(ns))
    assert dead_letters.arguments.as_amqp() == {"x-queue-type": "classic"}
    assert topo.queue(routing.tracker_queue(ns)).arguments.as_amqp() == {"x-queue-type": "quorum"}


def test_queue_arguments_leave_out_what_is_unset() -> None:
    """None means absent, not `x-...: null`; every field has its RabbitMQ name."""
    assert QueueArguments().as_amqp() == {}
    every = QueueArguments(
        queue_type="quorum",
        delivery_limit=1,
        dead_letter_exchange="dlx",
        dead_letter_routing_key="key",
        max_length=1,
        overflow="drop-head",
        message_ttl_ms=1,
    )
    assert set(every.as_amqp()) == {
        "x-queue-type",
        "x-delivery-limit",
        "x-dead-letter-exchange",
        "x-dead-letter-routing-key",
        "x-max-length",
        "x-overflow",
        "x-message-ttl",
    }


def test_the_webhook_stage_sends_each_attempt_once(env: SetEnv) -> None:
    """The webhook's declaration turns off quick in-process re-sends: every POST is an
    attempt its job record counts. A deployment-wide value still beats it; its own wins."""
    assert Settings().stage("webhook").transient_retries == 0
    assert Settings().stage("parse").transient_retries == 2
    env(SLUICE_TRANSIENT_RETRIES="3")
    assert Settings().stage("webhook").transient_retries == 3
    env(SLUICE_WEBHOOK_TRANSIENT_RETRIES="1")
    assert Settings().stage("webhook").transient_retries == 1
