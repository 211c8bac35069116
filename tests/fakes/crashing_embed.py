"""TEST DOUBLE: the real embed stage, except that a chunk containing `CRASH_MARKER` kills its
process with SIGKILL — as a segfault in a native library or the OOM killer would.

Run as a stage process: `python tests/fakes/crashing_embed.py` (settings from SLUICE_*).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from contracts import pipeline
from contracts.messages import ChunkBatch, EmbeddedBatch
from contracts.settings import Settings
from stages.builtin import embed
from stages.infra.logs import configure_logging
from stages.runtime.worker import serve
from stages.stage import Stage

CRASH_MARKER = "this-sentence-kills-its-worker"


async def handle(msg: ChunkBatch, ctx: embed.EmbedContext) -> list[EmbeddedBatch]:
    """Die on the marker; otherwise embed exactly as the real stage does."""
    if any(CRASH_MARKER in chunk.text for chunk in msg.chunks):
        os.kill(os.getpid(), signal.SIGKILL)
    return await embed.handle(msg, ctx)


STAGE = Stage(spec=pipeline.EMBED, startup=embed.startup, handle=handle)

if __name__ == "__main__":
    configure_logging("sluice-embed (crashing test double)")
    asyncio.run(serve(STAGE, Settings()))
