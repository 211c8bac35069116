"""bench/gpu.sh: the same steps as on a GPU, run on CPU with tiny sizes (a private RabbitMQ
and the real embed stage process), print one table with a number in every row; without a
CUDA device the script and its Python entry point refuse with a sentence, exit code 2; GPU
utilisation is read from nvidia-smi (a stand-in here)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# bench/ sits beside tests/, not on the suite's path (the suite imports tests/ by bare name).
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from bench import gpu  # noqa: E402

SCRIPT = REPO / "bench" / "gpu.sh"
ROW = re.compile(
    r"^\| (?P<phase>[^|]+?) \| (?P<precision>fp16|fp32) \| (?P<batch>\d+) \| "
    r"(?P<chunks>\d+) \| (?P<seconds>[\d.]+) \| (?P<rate>[\d.]+) \|"
)


def test_a_quick_cpu_run_prints_one_table_with_every_row() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| phase |") == 1
    rows = [m.groupdict() for line in done.stdout.splitlines() if (m := ROW.match(line))]
    raw = [(r["precision"], int(r["batch"])) for r in rows if r["phase"] == "raw model"]
    assert raw == [(p, b) for p in gpu.PRECISIONS for b in gpu.QUICK.batch_sizes]
    (stage,) = [r for r in rows if r["phase"] == "embed stage, queue backlog"]
    # Every queued chunk came back embedded, and each row measured a rate.
    assert int(stage["chunks"]) == gpu.QUICK.messages * gpu.QUICK.chunks_per_message
    assert all(float(r["rate"]) > 0 and float(r["seconds"]) > 0 for r in rows)


def test_the_script_is_executable_bash_that_parses() -> None:
    assert SCRIPT.stat().st_mode & stat.S_IXUSR
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0


def test_the_script_refuses_where_no_gpu_is_listed(tmp_path: Path) -> None:
    # An nvidia-smi that lists nothing, whatever this machine has.
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    fake.chmod(0o755)
    done = subprocess.run(
        ["bash", str(SCRIPT), "--quick"],
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == gpu.REFUSED
    assert "no CUDA device is visible" in done.stderr and "--device cpu" in done.stderr
    # Refused before anything was installed.
    assert "install.sh" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("cuda_build", "why"), [(None, "is a CPU build"), ("12.8", "no CUDA device is visible")]
)
def test_the_entry_point_refuses_without_cuda(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cuda_build: str | None,
    why: str,
) -> None:
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == gpu.REFUSED
    err = capsys.readouterr().err
    assert why in err and "--device cpu" in err


def test_gpu_utilisation_is_read_from_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in nvidia-smi answering for the GPU it is asked about (`-i 0`), as the real one.
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\n[ "$4" = 0 ] && echo 87 || echo 3\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sampler = gpu.GpuSampler(every_s=0.01)
    deadline = time.monotonic() + 10
    with sampler.sampling():
        while len(sampler.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert set(sampler.samples) == {87}
    assert sampler.summary() == "87 mean, 87 max"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert gpu.GpuSampler().summary() == "n/a (no nvidia-smi)"
