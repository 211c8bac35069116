"""The same phases on the commit before this work, in the same run: the gain side by side.

A `git worktree` of `BASELINE_REV` is checked out in a temporary directory and that commit's own
benchmark runs there (`python -m bench.run --phases overhead,sluice`) as a subprocess with this
interpreter, its own code first on `PYTHONPATH`: the old `stages`, `contracts`, `gateway` and
`bench` are imported instead of the editable install (whose finder comes after `sys.path`), in
the benchmark and in every stage process it launches (they inherit the environment). Its
results.json is read back; the worktree is removed whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# The commit before the "Fast round 2" issue.
BASELINE_REV = "56e5ce4"
PHASES = "overhead,sluice"
REPO = Path(__file__).resolve().parent.parent
LOG_TAIL = 40
# Printed by the subprocess that checks where the old code is imported from.
_WHERE = "import bench, contracts, gateway, stages; print(stages.__file__); " + (
    "print(all(m.__file__.startswith(sys.argv[1] + '/') "
    "for m in (bench, contracts, gateway, stages)))"
)


@dataclass(frozen=True)
class BaselineRun:
    """The old commit's figures of the same phases, as its own results.json has them."""

    rev: str
    commit: str
    # Where the subprocess imported `stages` from (inside the worktree, checked).
    stages_file: str
    scale: float
    overhead_ratio: float | None
    sluice_messages_per_s: float | None
    plain_messages_per_s: float | None
    sluice_chunks_per_s: float | None
    broker_messages_per_data_message: float | None
    errors: dict[str, str]
    wall_s: float


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def baseline(
    root: Path, *, rev: str, scale: float, overhead_repeat: int, deadline_s: float
) -> BaselineRun:
    """Run `rev`'s benchmark for `PHASES` at `scale` in a worktree under `root`; its figures."""
    root.mkdir(parents=True, exist_ok=True)
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    src, out, log = root / "baseline-src", root / "baseline-out", root / "baseline.log"
    started = time.monotonic()
    _git("worktree", "add", "--detach", str(src), commit)
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(src / "tests")])}
        # From outside the worktree, as the stage processes' `sluice` script runs: only
        # PYTHONPATH may decide where the code comes from.
        where = subprocess.run(
            [sys.executable, "-c", f"import sys; {_WHERE}", str(src)],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        print(f"  baseline {commit[:12]} imports stages from {where[0]}", flush=True)
        if where[-1] != "True":
            raise RuntimeError(f"the baseline run would not import its own code: {where}")
        command = [sys.executable, "-m", "bench.run", "--phases", PHASES, "--scale", str(scale)]
        command += ["--overhead-repeat", str(overhead_repeat), "--deadline-s", str(deadline_s)]
        with log.open("wb") as sink:
            returncode = _run_in_own_group(
                [*command, "--out", str(out)], cwd=src, env=env, sink=sink, timeout_s=3 * deadline_s
            )
        if returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL:])
            raise RuntimeError(f"the baseline benchmark exited {returncode}:\n{tail}")
        figures: dict[str, Any] = json.loads((out / "results.json").read_text())
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(src)], check=False
        )
    overhead: dict[str, Any] = figures.get("overhead") or {}
    sluice: dict[str, Any] = figures.get("sluice") or {}
    return BaselineRun(
        rev=rev,
        commit=commit,
        stages_file=where[0],
        scale=scale,
        overhead_ratio=overhead.get("ratio"),
        sluice_messages_per_s=overhead.get("sluice_messages_per_s"),
        plain_messages_per_s=(overhead.get("plain") or {}).get("messages_per_s"),
        sluice_chunks_per_s=sluice.get("chunks_per_s"),
        broker_messages_per_data_message=overhead.get("broker_messages_per_data_message"),
        errors=figures.get("errors") or {},
        wall_s=time.monotonic() - started,
    )


def _run_in_own_group(
    command: list[str], *, cwd: Path, env: dict[str, str], sink: IO[bytes], timeout_s: float
) -> int:
    """Run `command` in a process group of its own; past `timeout_s`, end the whole group
    (the old benchmark's RabbitMQ node and stage processes too), then raise TimeoutError."""
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        raise TimeoutError(f"the baseline benchmark ran past {timeout_s:.0f} s") from None
