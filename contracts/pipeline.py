"""The pipeline, declared once: which stages run, in what order, on which messages.

Everything else derives from this page: the broker topology (contracts/topology.py), each
stage's settings (`SLUICE_<STAGE>_*`), the job statuses, the CLI's stage choices, what the
web page shows (served by `GET /v1/config`) and the compose services (a test
checks them). `SLUICE_STAGES` picks the stages in order; `SLUICE_STAGE_MODULES` adds stage
modules from outside Sluice, whose `STAGE.spec` is a `StageSpec` like the built-in ones.

Routing keys name where a message goes, not what made it: a stage's queue binds its own
`input_key`, and a stage publishes its outputs with the next stage's `input_key`. Adding or
removing a stage therefore never leaves a stale binding behind on a long-lived broker.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from contracts import routing
from contracts.errors import SluiceError
from contracts.messages import (
    ChunkBatch,
    DocumentParsed,
    DocumentUploaded,
    EmbeddedBatch,
    Message,
    WebhookRequest,
)

if TYPE_CHECKING:
    from contracts.settings import Settings

STAGE_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,30}$"
# Statuses every job can have whatever its pipeline; each stage adds its own in between.
QUEUED = "queued"
INDEXED = "indexed"
FAILED = "failed"


class PipelineError(SluiceError):
    """The pipeline the settings describe cannot run; the message names the variable."""

    code = "usage_error"


@dataclass(frozen=True)
class StageSpec:
    """What the pipeline knows of one stage: its messages, its status and its defaults.

    `consumes` is the model its queue's messages must validate as; `produces` the model of
    its outputs (None for the last stage, which produces nothing). A stage between `chunk`
    and `index` hands on one batch per batch it received, with the same `batch_index` and
    `batch_count`: that is how a document is known to be complete, whatever a stage did to
    the number of chunks in a batch.
    """

    name: str
    consumes: type[Message]
    produces: type[Message] | None
    # The job's status while this stage has it ("parsing"); empty means the stage's name.
    status: str = ""
    # The routing key this stage's queue binds (the previous stage publishes with it);
    # empty means `doc.<name>`.
    input_key: str = ""
    prefetch: int = 4
    concurrency: int = 2
    # Where a process of this stage serves /metrics; 0 picks a free port.
    metrics_port: int = 0
    # Retry policy defaults; None means the deployment-wide `SLUICE_RETRY_*` settings.
    retry_delays_s: tuple[int, ...] | None = None
    max_attempts: int | None = None
    # Quick in-process retries of a transient error before a retry tier; None means
    # `SLUICE_TRANSIENT_RETRIES`.
    transient_retries: int | None = None
    # Whether outputs of its own input type go back to its own queue, so several of its
    # workers share one document: parse sends the page ranges of a scan to be read with OCR.
    fans_out: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(STAGE_NAME_PATTERN, self.name):
            raise PipelineError(
                f"stage name {self.name!r} is not valid: a-z, 0-9 and '_', starting with a letter"
            )
        # Frozen, so the derived defaults are set the way dataclasses themselves do it.
        if not self.status:
            object.__setattr__(self, "status", self.name)
        if not self.input_key:
            object.__setattr__(self, "input_key", routing.stage_input_key(self.name))


PARSE = StageSpec(
    "parse",
    DocumentUploaded,
    DocumentParsed,
    "parsing",
    routing.DOC_UPLOADED,
    prefetch=2,
    concurrency=1,
    metrics_port=9101,
    fans_out=True,
)
CHUNK = StageSpec(
    "chunk",
    DocumentParsed,
    ChunkBatch,
    "chunking",
    routing.DOC_PARSED,
    prefetch=4,
    concurrency=2,
    metrics_port=9102,
)
ENRICH = StageSpec(
    "enrich",
    ChunkBatch,
    ChunkBatch,
    "enriching",
    routing.DOC_TO_ENRICH,
    prefetch=8,
    concurrency=4,
    metrics_port=9105,
)
EMBED = StageSpec(
    "embed",
    ChunkBatch,
    EmbeddedBatch,
    "embedding",
    routing.DOC_CHUNKED,
    prefetch=32,
    concurrency=32,
    metrics_port=9103,
)
INDEX = StageSpec(
    "index",
    EmbeddedBatch,
    None,
    "indexing",
    routing.DOC_EMBEDDED,
    prefetch=16,
    concurrency=16,
    metrics_port=9104,
)

# A side stage: not a step of a document's way to the index but a consumer with the same
# runtime (lanes, retry tiers, dead letters, metrics): it POSTs a finished job to the
# `callback_url` its upload named, so a slow receiver never holds a pipeline worker.
WEBHOOK = StageSpec(
    "webhook",
    WebhookRequest,
    None,
    "webhook",
    routing.WEBHOOK,
    prefetch=16,
    concurrency=16,
    metrics_port=9106,
    # A receiver that is down gets time to come back: about a day in all.
    retry_delays_s=(5, 30, 300, 1800),
    max_attempts=12,
    # Each attempt is one POST the job's webhook record counts: no unseen quick re-sends.
    transient_retries=0,
)
# Side stages run in every deployment, beside the pipeline (`sluice up` starts them too).
SIDE_STAGES: tuple[StageSpec, ...] = (WEBHOOK,)

BUILTIN: MappingProxyType[str, StageSpec] = MappingProxyType(
    {s.name: s for s in (PARSE, CHUNK, ENRICH, EMBED, INDEX, *SIDE_STAGES)}
)
# Where each built-in stage's module lives (a name, not an import: contracts import nothing).
BUILTIN_MODULES: MappingProxyType[str, str] = MappingProxyType(
    {name: f"stages.builtin.{name}" for name in BUILTIN}
)
# The pipeline when SLUICE_STAGES is not set.
DEFAULT_STAGE_NAMES: tuple[str, ...] = ("parse", "chunk", "embed", "index")
DEFAULT_STAGES = ",".join(DEFAULT_STAGE_NAMES)


@dataclass(frozen=True)
class Pipeline:
    """The stages of one deployment, in order, and the module each comes from."""

    stages: tuple[StageSpec, ...]
    modules: MappingProxyType[str, str]
    # Consumers beside the pipeline (the webhook stage): not steps of a job's status.
    side: tuple[StageSpec, ...] = SIDE_STAGES

    @property
    def names(self) -> tuple[str, ...]:
        """Stage names in pipeline order."""
        return tuple(s.name for s in self.stages)

    @property
    def first(self) -> StageSpec:
        """The stage an upload goes to."""
        return self.stages[0]

    @property
    def last(self) -> StageSpec:
        """The stage that finishes a document (the index)."""
        return self.stages[-1]

    @property
    def processes(self) -> tuple[StageSpec, ...]:
        """Every stage a deployment runs processes of: the pipeline's, then the side stages."""
        return (*self.stages, *self.side)

    def spec(self, name: str) -> StageSpec:
        """The declaration of one stage of this pipeline (or a side stage)."""
        for spec in self.processes:
            if spec.name == name:
                return spec
        raise PipelineError(
            f"stage {name!r} is not in this pipeline ({', '.join(self.names)}); "
            "add it to SLUICE_STAGES"
        )

    def has(self, name: str) -> bool:
        """Whether a stage is part of this pipeline (side stages are not)."""
        return name in self.names

    def next_of(self, name: str) -> StageSpec | None:
        """The stage after `name`, or None after the last one (and for a side stage)."""
        if name not in self.names:
            return None
        position = self.names.index(name)
        return self.stages[position + 1] if position + 1 < len(self.stages) else None

    def output_key(self, name: str) -> str | None:
        """The routing key a stage publishes its outputs with (the next stage's input)."""
        following = self.next_of(name)
        return following.input_key if following else None

    def key_of_output(self, name: str, output: Message) -> str | None:
        """Where one output of stage `name` goes: back to its own queue for work it fans out
        (`StageSpec.fans_out`), else to the next stage."""
        spec = self.spec(name)
        if spec.fans_out and isinstance(output, spec.consumes):
            return spec.input_key
        return self.output_key(name)

    def stage_of_key(self, routing_key: str) -> str | None:
        """The stage whose queue a routing key feeds."""
        return next((s.name for s in self.stages if s.input_key == routing_key), None)

    @property
    def statuses(self) -> tuple[str, ...]:
        """Every job status in the order a job moves through them, `failed` last."""
        return (QUEUED, *(s.status for s in self.stages), INDEXED, FAILED)


def resolve(settings: Settings) -> Pipeline:
    """The pipeline `SLUICE_STAGES` and `SLUICE_STAGE_MODULES` describe, checked end to end."""
    return build(settings.stages, settings.stage_modules)


def default_pipeline() -> Pipeline:
    """parse → chunk → embed → index, the pipeline without any settings."""
    return build(DEFAULT_STAGES)


def build(stages: str, stage_modules: str = "") -> Pipeline:
    """The pipeline of a `SLUICE_STAGES` and a `SLUICE_STAGE_MODULES` value."""
    modules = dict(BUILTIN_MODULES)
    plugins = _plugin_modules(stage_modules)
    modules.update(plugins)
    names = [n.strip() for n in stages.split(",") if n.strip()]
    side = [n for n in names if n in {s.name for s in SIDE_STAGES}]
    if side:
        raise PipelineError(
            f"SLUICE_STAGES names {', '.join(side)}, which always runs beside the pipeline; "
            "leave it out"
        )
    if not names:
        raise PipelineError("SLUICE_STAGES is empty: name the stages in order, e.g. parse,chunk")
    if len(set(names)) != len(names):
        raise PipelineError(f"SLUICE_STAGES names a stage twice: {stages!r}")
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise PipelineError(
            f"SLUICE_STAGES names unknown stage(s) {', '.join(unknown)}: use "
            f"{', '.join(modules)}, or plug one in with SLUICE_STAGE_MODULES=name=package.module"
        )
    # Every plug-in is imported, named in SLUICE_STAGES or not: a module that does not
    # import is a mistake to report at start-up, not when someone first turns it on.
    plugged = {name: _load_spec(name, module) for name, module in plugins.items()}
    specs = tuple(plugged.get(n) or BUILTIN[n] for n in names)
    pipeline = Pipeline(specs, MappingProxyType(modules))
    _check_chain(pipeline)
    return pipeline


def _plugin_modules(raw: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        name, eq, module = (part.strip() for part in entry.partition("="))
        if not eq or not module or not re.fullmatch(STAGE_NAME_PATTERN, name):
            raise PipelineError(
                f"SLUICE_STAGE_MODULES entry {entry!r} is not `name=package.module` "
                "(a name of a-z, 0-9 and '_', starting with a letter)"
            )
        if name in BUILTIN:
            raise PipelineError(
                f"SLUICE_STAGE_MODULES entry {entry!r} reuses the built-in stage name {name!r}"
            )
        found[name] = module
    return found


def _load_spec(name: str, module_name: str) -> StageSpec:
    """Import a plug-in stage module and read its declaration."""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise PipelineError(
            f"SLUICE_STAGE_MODULES: stage {name!r} names module {module_name!r}, which does "
            f"not import ({type(exc).__name__}: {exc}); check the name and that its package "
            "is on PYTHONPATH"
        ) from exc
    spec = getattr(getattr(module, "STAGE", None), "spec", None)
    if not isinstance(spec, StageSpec):
        raise PipelineError(
            f"SLUICE_STAGE_MODULES: module {module_name!r} has no `STAGE = Stage(spec=...)`"
        )
    if spec.name != name:
        raise PipelineError(
            f"SLUICE_STAGE_MODULES: {name}={module_name} declares a stage named {spec.name!r}"
        )
    return spec


def _check_chain(pipeline: Pipeline) -> None:
    """Each stage must read what the one before it writes, from an upload to the index."""
    if pipeline.first.consumes is not DocumentUploaded:
        raise PipelineError(
            f"SLUICE_STAGES must start with a stage that reads uploads (parse), "
            f"not {pipeline.first.name!r}"
        )
    if pipeline.last.produces is not None:
        raise PipelineError(
            f"SLUICE_STAGES must end with the index stage, not {pipeline.last.name!r}"
        )
    keys = [s.input_key for s in pipeline.stages]
    if len(set(keys)) != len(keys):
        raise PipelineError("SLUICE_STAGES: two stages bind the same input routing key")
    for before, after in zip(pipeline.stages, pipeline.stages[1:], strict=False):
        made = before.produces
        if made is None or not issubclass(made, after.consumes):
            raise PipelineError(
                f"SLUICE_STAGES: {after.name!r} reads {after.consumes.__name__} but "
                f"{before.name!r} before it writes "
                f"{made.__name__ if made else 'nothing'}; reorder the stages"
            )
