"""TEST DOUBLE: the real enrich stage process, except that YAKE breaks on a chunk containing
`FAIL_MARKER`, as a bug in YAKE would on some text.

The break is inside YAKE (its candidate builder raises), where YAKE itself catches the error,
logs it and returns no keywords: the stage must still fail the chunk, not index it bare.
Everything else is `sluice stage enrich`: the same `run_stage` with the same settings.

Run as a stage process: `python tests/fakes/failing_enrich.py` (settings from SLUICE_*).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import yake.core.yake

from contracts.settings import Settings
from stages.runtime.worker import run_stage

FAIL_MARKER = "yakebreaksonthisword"


class FailsOnMarker(yake.core.yake.DataCore):  # type: ignore[misc]
    """YAKE's text model, which raises for text holding the marker."""

    def __init__(self, text: str, *args: Any, **kwargs: Any) -> None:
        if FAIL_MARKER in text:
            raise RuntimeError("candidate graph has a cycle")
        super().__init__(text, *args, **kwargs)


if __name__ == "__main__":
    # YAKE's extractor looks its text model up in this module at every call.
    yake.core.yake.DataCore = FailsOnMarker
    run_stage("enrich", Settings())
