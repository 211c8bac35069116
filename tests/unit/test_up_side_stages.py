"""`sluice up` runs the side stages (the webhook) beside the pipeline, each as
`sluice stage NAME`, and `sluice stage webhook` is a command a process can run."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from contracts.pipeline import SIDE_STAGES
from gateway.cli import main, supervisor
from gateway.cli.supervisor import ChildSpec

REPO = Path(__file__).resolve().parents[2]


def _children_of_up(monkeypatch: pytest.MonkeyPatch, *args: str) -> list[ChildSpec]:
    """The processes `sluice up ARGS` would supervise (the supervisor itself is not run)."""
    started: list[ChildSpec] = []

    def run(children: Sequence[ChildSpec], **_: object) -> int:
        started.extend(children)
        return 0

    monkeypatch.setattr(supervisor, "run_supervisor", run)
    monkeypatch.delenv("SLUICE_STAGES", raising=False)
    parsed = main.build_parser().parse_args(["up", *args])
    assert parsed.handler(parsed) == 0
    return started


def test_up_runs_every_side_stage_after_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    children = _children_of_up(monkeypatch)

    names = [child.name for child in children]
    assert names == ["gateway", "parse", "chunk", "embed", "index", "webhook"]
    assert [c.name for c in children if c.argv[-2:] == ("stage", "webhook")] == ["webhook"]
    assert {s.name for s in SIDE_STAGES} <= set(names)


def test_up_can_run_the_webhook_stage_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    children = _children_of_up(monkeypatch, "--no-gateway", "--stages", "webhook")
    assert [(c.name, c.argv[-2:]) for c in children] == [("webhook", ("stage", "webhook"))]


def test_sluice_stage_accepts_the_webhook_stage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "stage", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "webhook" in result.stdout
