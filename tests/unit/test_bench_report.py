"""The benchmark's report and chart show what a run measured and nothing else: rows only for
the phases that ran, and one chart panel per measured group, each with its unit and target.

Every figure below is hand-made test data, not a measurement."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, cast

# bench/ sits beside tests/, not on the suite's path (the suite imports tests/ by bare name).
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.append(_REPO)

from bench.baseline import BaselineRun  # noqa: E402
from bench.chart import chart, figure, panels  # noqa: E402
from bench.int8_quality import Int8Quality  # noqa: E402
from bench.overhead import Overhead  # noqa: E402
from bench.pika_chain import PlainRun  # noqa: E402
from bench.prepare import Prepared  # noqa: E402
from bench.raw_model import RawModel  # noqa: E402
from bench.report import OVERHEAD_RATIO, Results, markdown  # noqa: E402
from bench.sluice_run import EndToEnd  # noqa: E402
from bench.vector_codec import VectorCodec  # noqa: E402
from bench.zerocost import ZeroCost  # noqa: E402

CPU = {"gateway": 4.0, "parse": 2.0, "chunk": 1.0, "embed": 1.0, "index": 2.0}


def _results(**phases: object) -> Results:
    prepared = Prepared(texts=[f"test chunk {n}" for n in range(200)])
    return Results(
        scale=0.1,
        documents=8,
        prepared=prepared,
        default_backend="torch",
        **phases,  # type: ignore[arg-type]
    )


def _raw() -> RawModel:
    return RawModel(chunks=200, chunks_per_s={16: 40.0, 64: 50.0}, cpu_s={16: 9.0, 64: 8.0})


def _e2e(chunks_per_s: float) -> EndToEnd:
    return EndToEnd(
        documents=8,
        chunks=200,
        wall_s=200 / chunks_per_s,
        failed=0,
        upload_ms_p50=5.0,
        upload_ms_p99=9.0,
        chunks_by_document={},
        busy_s={},
        cpu_s=CPU,
    )


def _zerocost() -> ZeroCost:
    return ZeroCost(
        documents=24,
        chunks=600,
        wall_s=3.0,
        repeat=3,
        failed=0,
        cpu_s=CPU,
        event_deliveries=90,
        tracker_cpu_s=1.0,
    )


def _overhead() -> Overhead:
    return Overhead(
        messages=1000,
        sluice_s=2.0,
        event_messages=500,
        sluice_cpu_s=CPU,
        plain=PlainRun(messages=1000, wall_s=1.0, cpu_s={}),
    )


def test_the_table_has_rows_only_for_the_phases_that_ran() -> None:
    text = markdown(_results(raw=_raw(), zerocost=_zerocost()))

    assert "Raw model limit" in text
    assert "Zero-cost embedder, real parse" in text
    assert "tracker **600**" in text
    # The gateway's row is its process CPU less the tracker's: 600 chunks / (4 - 1) s.
    assert "gateway without the tracker **200**" in text
    for absent in ("Sluice end to end", "Celery", "Pipeline overhead", "recall@3", "KB →"):
        assert absent not in text


def test_an_end_to_end_variant_without_the_raw_model_has_no_ratio() -> None:
    text = markdown(_results(e2e_int8=_e2e(80.0)))

    assert "`SLUICE_EMBED_BACKEND=onnx-int8`" in text
    assert "80.0 chunks/s" in text
    assert "x raw fp32" not in text
    assert "SLUICE_EMBED_BACKEND=torch" not in text


def test_a_reused_run_says_so_and_is_checked_against_its_target() -> None:
    run = _e2e(46.0)
    text = markdown(_results(raw=_raw(), e2e=run, e2e_fp32=run, reused=["sluice-fp32"]))

    (row,) = [line for line in text.splitlines() if "SLUICE_EMBED_BACKEND=torch" in line]
    assert "0.92x raw fp32" in row
    assert "the `sluice` phase's run" in row
    assert row.endswith("| met |")


def test_one_panel_per_measured_group_each_with_a_unit_and_its_target() -> None:
    r = _results(raw=_raw(), e2e=_e2e(45.0), overhead=_overhead(), zerocost=_zerocost())

    drawn = panels(r)

    assert [p.title for p in drawn] == [
        "End-to-end throughput",
        "Zero-cost embedder run: cost of each process",
        "Pipeline overhead",
    ]
    assert all(p.unit for p in drawn)
    throughput, per_process, messages = drawn
    assert throughput.targets == {"0.9x raw fp32": 0.9 * 50.0}
    assert throughput.values["zero-cost embedder (ceiling)"] == 200.0
    assert per_process.targets == {}
    assert messages.targets == {f"{OVERHEAD_RATIO}x aio-pika": OVERHEAD_RATIO * 1000.0}


def test_int8_end_to_end_gets_its_own_target_line() -> None:
    (throughput,) = panels(_results(raw=_raw(), e2e_int8=_e2e(80.0)))

    assert throughput.values == {"raw fp32 model": 50.0, "Sluice INT8": 80.0}
    assert throughput.targets == {"0.9x raw fp32": 45.0, "1.8x raw fp32 (INT8)": 90.0}


def test_the_chart_has_exactly_the_measured_panels(tmp_path: Path) -> None:
    r = _results(overhead=_overhead())

    fig = figure(r)

    assert len(fig.axes) == len(panels(r)) == 1
    (ax,) = fig.axes
    assert ax.get_ylabel() == "messages/s"
    (line,) = ax.get_lines()
    assert line.get_label() == f"{OVERHEAD_RATIO}x aio-pika"
    assert cast(Any, line.get_ydata())[0] == OVERHEAD_RATIO * 1000.0
    chart(r, tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 0


def test_a_run_of_no_charted_phase_draws_no_empty_axes() -> None:
    assert figure(_results()).axes == []


def _int8(recall_int8: float) -> Int8Quality:
    return Int8Quality(
        chunks=200,
        queries=50,
        torch_fp32_chunks_per_s=40.0,
        onnx_fp32_chunks_per_s=50.0,
        int8_chunks_per_s=90.0,
        cosine_mean=0.99,
        cosine_min=0.95,
        recall_at_3_fp32=0.90,
        recall_at_3_int8=recall_int8,
        weight_type="test weights",
    )


def _recall_row(text: str) -> str:
    (row,) = [line for line in text.splitlines() if "recall@3" in line]
    return row


def test_int8_recall_is_checked_within_one_point_of_fp32() -> None:
    assert _recall_row(markdown(_results(int8=_int8(0.895)))).endswith("| met |")
    assert _recall_row(markdown(_results(int8=_int8(0.88)))).endswith("| **not met** |")


def test_vector_bytes_have_a_row_and_a_panel_in_kilobytes() -> None:
    codec = VectorCodec(
        chunks=64,
        dimensions=384,
        json_bytes=2048,
        packed_bytes=1024,
        json_encode_ms=2.0,
        json_decode_ms=3.0,
        packed_encode_ms=0.5,
        packed_decode_ms=0.25,
    )
    r = _results(vectors=codec)

    assert "**2.0 KB → 1.0 KB**" in markdown(r)
    (panel,) = panels(r)
    assert panel.unit == "KB per batch"
    assert panel.values == {"JSON lists (v1)": 2.0, "packed (v2)": 1.0}


def test_the_commit_before_sits_beside_this_run() -> None:
    before = BaselineRun(
        rev="test-rev",
        commit="0" * 40,
        stages_file="/test/stages/__init__.py",
        scale=0.1,
        overhead_ratio=0.4,
        sluice_messages_per_s=400.0,
        plain_messages_per_s=1000.0,
        sluice_chunks_per_s=None,
        broker_messages_per_data_message=None,
        errors={"sluice": "test failure"},
        wall_s=10.0,
    )
    text = markdown(_results(overhead=_overhead(), baseline=before))

    (ratio,) = [line for line in text.splitlines() if "Pipeline overhead ratio" in line]
    assert "0.40 → **0.50** (1.25x)" in ratio
    assert ratio.endswith("| **not met** |")
    # What the old run did not measure is said, not made up.
    assert "not measured → **not measured** chunks/s" in text
    assert "not measured → **1.50**" in text
    assert "sluice: test failure" in text
    (messages,) = panels(_results(overhead=_overhead(), baseline=before))
    assert messages.values["Sluice at test-rev"] == 400.0
