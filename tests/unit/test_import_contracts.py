"""The layer rules in pyproject's `[tool.importlinter]` hold on the tree, and really bite.

A rule that cannot fail proves nothing, so each contract is also run on a copy of the
packages with one forbidden import added, and must break there, naming that import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("contracts", "stages", "gateway")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with pyproject.toml's contracts, on the packages found under `cwd`."""
    # lint-imports puts its working directory first on sys.path, so a copy shadows the
    # editable install; PYTHONPATH set by a caller must not put the real tree first.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache", *args, "pyproject.toml"],
        cwd=cwd,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_tree_keeps_every_contract() -> None:
    """`lint-imports` passes on the tree as it is (scripts/test.sh runs it too)."""
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The three packages and pyproject.toml, copied: the contracts exactly as written."""
    for package in PACKAGES:
        shutil.copytree(
            REPO / package,
            tmp_path / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "static"),
        )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize(
    ("contract", "module", "forbidden"),
    [
        ("contracts-pure", "contracts.messages", "aio_pika"),
        ("contracts-pure", "contracts.routing", "fastapi"),
        ("contracts-pure", "contracts.pipeline", "stages.builtin.parse"),
        ("stage-modules", "stages.builtin.chunk", "aio_pika"),
        ("stage-modules", "stages.kit.batching", "stages.runtime.worker"),
        ("gateway", "gateway.http.routes.page", "stages.builtin.parse"),
        # The one allowed way in is `gateway.cli.main -> stages.runtime.worker`, no other.
        ("gateway", "gateway.cli.supervisor", "stages.runtime.worker"),
        ("infra", "stages.infra.logs", "gateway.http.app"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    copy: Path, contract: str, module: str, forbidden: str
) -> None:
    """One added `import` breaks the contract, and the report names the offending line."""
    source = copy.joinpath(*module.split(".")).with_suffix(".py")
    with source.open("a") as file:
        file.write(f"\nimport {forbidden}  # noqa: F401, E402\n")
    result = _lint_imports(copy, "--contract", contract)
    report = result.stdout + result.stderr
    assert result.returncode == 1, report
    assert "BROKEN" in report and f"{module} -> {forbidden}" in report, report
