"""Benchmarks: Sluice measured side by side with the pipelines users run today."""

import sys
from pathlib import Path

# The private broker, the pipeline launcher and the document builders live with the tests,
# imported by bare name as the tests import them.
_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
