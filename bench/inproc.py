"""The four Sluice stage handlers called in one process, one after another, as plain functions.

This is what the baselines share with Sluice: exactly the same `startup` and `handle` of each
stage, only without a broker between them.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from contracts.messages import STAGES, DocumentUploaded, Message, StageName
from contracts.settings import Settings
from stages.backends.blobs import LocalBlobStore
from stages.formats import sniff
from stages.stage import Stage, load_stage


@contextmanager
def clean_environment(**env: str) -> Iterator[None]:
    """`os.environ` without the caller's `SLUICE_*` settings, plus `env`, for the block."""
    # The benchmark measures Sluice's defaults, never whatever the user has exported.
    kept = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    with mock.patch.dict(os.environ, {**kept, **env}, clear=True):
        yield


def bench_settings(data_dir: Path, **env: str) -> Settings:
    """Sluice's default settings with the data under `data_dir` (and `SLUICE_*` overrides)."""
    with clean_environment(SLUICE_DATA_DIR=str(data_dir), **env):
        return Settings()


@dataclass
class Passage:
    """What one document left behind at each stage, and the seconds each stage took."""

    outputs: dict[StageName, list[Message]] = field(default_factory=dict)
    seconds: dict[StageName, float] = field(default_factory=dict)

    @property
    def chunks(self) -> int:
        """How many chunks the chunk stage cut the document into."""
        return sum(m.unit()[2] for m in self.outputs.get("chunk", []))


class InProcess:
    """Contexts of some stages, built once by each stage's own `startup`."""

    def __init__(self, settings: Settings, stages: dict[StageName, tuple[Stage[Any, Any], Any]]):
        self.settings = settings
        self.stages = stages
        self.blobs = LocalBlobStore(settings.blob_dir)

    @classmethod
    async def start(cls, settings: Settings, names: Sequence[StageName] = STAGES) -> InProcess:
        """Run the `startup` of each named stage (the embed model loads here)."""
        stages: dict[StageName, tuple[Stage[Any, Any], Any]] = {}
        for name in names:
            stage = load_stage(name)
            stages[name] = (stage, await stage.startup(settings))
        return cls(settings, stages)

    async def close(self) -> None:
        """Run each stage's `shutdown` (the parse workers stop here)."""
        for stage, ctx in self.stages.values():
            await stage.shutdown(ctx)

    def uploaded(self, filename: str, data: bytes, collection: str) -> DocumentUploaded:
        """Store an upload's bytes and describe it as the gateway would."""
        sha256 = self.blobs.put_bytes(data)
        return DocumentUploaded(
            job_id=uuid.uuid4().hex,
            document_id=uuid.uuid4().hex,
            collection=collection,
            filename=filename,
            blob_sha256=sha256,
            content_type=sniff(self.blobs.path(sha256)),
            size_bytes=len(data),
        )

    async def run(self, msg: Message) -> Passage:
        """Feed `msg` through every stage held, in order, each output into the next handler."""
        passage = Passage()
        current: list[Message] = [msg]
        for name, (stage, ctx) in self.stages.items():
            started = time.perf_counter()
            produced: list[Message] = []
            for item in current:
                produced.extend(await stage.handle(item, ctx))
            passage.seconds[name] = time.perf_counter() - started
            passage.outputs[name] = produced
            current = produced
        return passage
