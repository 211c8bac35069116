"""`sluice ingest`, `search` and `jobs` against the real pipeline, as a user runs them."""

from __future__ import annotations

from pathlib import Path

from documents import PDF_PAGE_2, corpus, make_image_only_pdf
from pipeline import Pipeline, run_sluice


def test_ingest_a_folder_then_search_it(pipeline: Pipeline, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "nested").mkdir(parents=True)
    for n, (name, data) in enumerate(corpus().items()):
        (folder / ("nested" if n % 2 else "") / name).write_bytes(data)
    (folder / ".hidden.txt").write_text("hidden files are skipped")

    ingest = run_sluice(pipeline, "ingest", str(folder), "--collection", "cli")
    assert ingest.returncode == 0, ingest.stdout + ingest.stderr
    lines = ingest.stdout.strip().splitlines()
    assert "5 indexed, 0 failed" in lines, ingest.stdout
    assert ".hidden.txt" not in ingest.stdout

    search = run_sluice(pipeline, "search", PDF_PAGE_2, "--collection", "cli", "-k", "1")
    assert search.returncode == 0, search.stderr
    assert "report.pdf" in search.stdout and "Arctic terns" in search.stdout

    jobs = run_sluice(pipeline, "jobs", "--collection", "cli")
    assert jobs.returncode == 0, jobs.stderr
    assert jobs.stdout.count("indexed") >= 5


def test_ingest_reports_failures_and_exits_1(pipeline: Pipeline, tmp_path: Path) -> None:
    (tmp_path / "good.md").write_text("# Good\n\nKelp forests shelter sea otters from storms.\n")
    (tmp_path / "scan.pdf").write_bytes(make_image_only_pdf())
    (tmp_path / "photo.pdf").write_bytes(b"GIF89a" + b"\x00" * 64)

    ingest = run_sluice(pipeline, "ingest", str(tmp_path), "--collection", "cli-failures")
    assert ingest.returncode == 1, ingest.stdout + ingest.stderr
    out = ingest.stdout
    assert "1 indexed, 2 failed" in out.splitlines(), out
    assert "scan.pdf" in out and "no_text" in out
    assert "photo.pdf" in out and "unsupported_media_type" in out

    failed = run_sluice(pipeline, "jobs", "--failed", "--collection", "cli-failures")
    assert "scan.pdf" in failed.stdout and "good.md" not in failed.stdout
