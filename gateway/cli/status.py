"""`sluice status`: the pipeline's stages and workers from `GET /v1/pipeline`, once or live."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from contracts.errors import SluiceError
from gateway.cli.client import SluiceClient
from gateway.cli.tables import print_table

STAGE_HEADER = (
    "stage",
    "ready i/b",
    "unacked i/b",
    "consumers",
    "in/s",
    "out/s",
    "workers ok/all",
)
WORKER_HEADER = (
    "stage",
    "worker",
    "host",
    "pid",
    "last seen",
    "processed",
    "failed",
    "in hand",
    "healthy",
)


def run_status(args: argparse.Namespace, url: str) -> int:
    """Print the pipeline once, or redraw it every `--watch` seconds until Ctrl-C."""
    if args.watch is None:
        show(asyncio.run(_fetch(url, args.api_key)), as_json=args.json)
        return 0
    try:
        asyncio.run(_watch(url, args.api_key, args.watch, args.json))
    except KeyboardInterrupt:
        return 0
    return 0


async def _fetch(url: str, api_key: str | None) -> dict[str, Any]:
    async with SluiceClient(url, api_key, timeout_s=10.0) as client:
        return await client.pipeline()


async def _watch(url: str, api_key: str | None, every_s: float, as_json: bool) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    async with SluiceClient(url, api_key, timeout_s=10.0) as client:
        while True:
            try:
                answer = await client.pipeline()
            except SluiceError as exc:
                # A gateway being restarted comes back: say so and keep watching.
                answer = None
                problem = exc.message
            if console.is_terminal:
                console.clear()
            else:
                print(flush=True)
            if answer is None:
                print(f"{_now()}  {problem}", flush=True)
            else:
                if not as_json:
                    print(f"{_now()}  every {every_s:g}s, Ctrl-C to stop", flush=True)
                show(answer, as_json=as_json)
            await asyncio.sleep(every_s)


def _now() -> str:
    return datetime.now(UTC).strftime("%H:%M:%S UTC")


def show(answer: dict[str, Any], *, as_json: bool = False) -> None:
    """Print one answer: the JSON, or a table of stages and one of workers."""
    if as_json:
        print(json.dumps(answer, indent=2), flush=True)
        return
    if answer.get("stale"):
        print(
            "stale: the gateway cannot reach RabbitMQ; these numbers are the last it knew",
            flush=True,
        )
    stages: dict[str, Any] = answer.get("stages", {})
    print_table(STAGE_HEADER, [stage_row(n, s) for n, s in stages.items()], empty="no stages")
    print()
    now = datetime.now(UTC)
    workers = [
        worker_row(name, worker, now)
        for name, stage in stages.items()
        for worker in stage.get("workers", [])
    ]
    print_table(WORKER_HEADER, workers, empty="no workers heard")


def stage_row(name: str, stage: dict[str, Any]) -> tuple[str, ...]:
    """One stage: both lanes' depths, consumers, rates and healthy workers."""
    queues = stage.get("queues", {})

    def lanes(field: str) -> str:
        return "/".join(str(queues.get(lane, {}).get(field, 0)) for lane in ("interactive", "bulk"))

    rates = stage.get("rate_per_s", {})
    workers = stage.get("workers", [])
    healthy = sum(1 for w in workers if w.get("healthy"))
    return (
        name + (" (side)" if stage.get("side") else ""),
        lanes("ready"),
        lanes("unacked"),
        str(stage.get("consumers", 0)),
        f"{float(rates.get('in', 0.0)):.1f}",
        f"{float(rates.get('out', 0.0)):.1f}",
        f"{healthy}/{len(workers)}",
    )


def worker_row(stage: str, worker: dict[str, Any], now: datetime) -> tuple[str, ...]:
    """One worker: who and where it is, when it was last heard, what it did and holds."""
    return (
        stage,
        str(worker.get("id", "")),
        str(worker.get("host", "")),
        str(worker.get("pid", "")),
        _seen(worker.get("last_seen_at"), now),
        str(worker.get("processed", 0)),
        str(worker.get("failed", 0)),
        str(sum(worker.get("in_hand_by_lane", {}).values()) or len(worker.get("in_hand", []))),
        "yes" if worker.get("healthy") else "NO",
    )


def _seen(when: str | None, now: datetime) -> str:
    """How long ago: `3s ago`, `4m ago`."""
    if not when:
        return "-"
    try:
        seconds = max(0.0, (now - datetime.fromisoformat(when)).total_seconds())
    except ValueError:
        return when
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m ago"
    return f"{seconds // 3600:.0f}h ago"
