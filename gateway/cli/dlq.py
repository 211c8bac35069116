"""`sluice dlq list|replay`: the dead-letter queue through the gateway's HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from typing import Any

from gateway.cli.tables import print_table

_REASON_CHARS = 60


def configure(
    dlq: argparse.ArgumentParser,
    common: argparse.ArgumentParser,
    base_url: Callable[[argparse.Namespace], str],
    stages: tuple[str, ...],
) -> None:
    """Add `list` and `replay` under the `dlq` command."""
    sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = sub.add_parser("list", parents=[common], help="show dead letters, oldest first")
    listing.add_argument("--json", action="store_true", help="print the raw JSON")
    listing.set_defaults(handler=lambda args: run_list(args, base_url(args)))
    replay = sub.add_parser(
        "replay", parents=[common], help="send dead letters back to the stage they failed in"
    )
    replay.add_argument("--stage", choices=stages, help="only letters that died in this stage")
    replay.add_argument("--job", metavar="ID", help="only this job's letters")
    replay.add_argument("--all", action="store_true", help="every dead letter")
    replay.set_defaults(handler=lambda args: run_replay(args, base_url(args)))


def run_list(args: argparse.Namespace, url: str) -> int:
    """Print the dead letters as a table (tab-separated when piped)."""
    from gateway.cli.client import SluiceClient

    async def fetch() -> list[dict[str, Any]]:
        async with SluiceClient(url, args.api_key) as client:
            return await client.dead_letters()

    letters = asyncio.run(fetch())
    if args.json:
        print(json.dumps({"dead_letters": letters}, indent=2))
        return 0
    header = ("job id", "stage", "code", "reason", "attempts", "age")
    print_table(header, [_letter_row(letter) for letter in letters], empty="no dead letters")
    return 0


def run_replay(args: argparse.Namespace, url: str) -> int:
    """Replay the chosen dead letters and say how many went back, for which jobs."""
    from gateway.cli.client import SluiceClient
    from gateway.cli.ingest import UsageError

    if not (args.all or args.stage or args.job):
        raise UsageError("say which dead letters to replay: --stage S, --job ID or --all")

    async def send() -> dict[str, Any]:
        async with SluiceClient(url, args.api_key) as client:
            return await client.replay_dead_letters(stage=args.stage, job_id=args.job, all=args.all)

    answer = asyncio.run(send())
    jobs: list[str] = answer.get("jobs", [])
    count = int(answer.get("replayed", 0))
    print(
        f"replayed {count} dead letter{'s' * (count != 1)}"
        f" of {len(jobs)} job{'s' * (len(jobs) != 1)}"
    )
    for job_id in jobs:
        print(f"  {job_id}")
    return 0


def _letter_row(letter: dict[str, Any]) -> tuple[str, ...]:
    reason = " ".join(str(letter.get("reason", "")).split())
    if len(reason) > _REASON_CHARS:
        reason = reason[: _REASON_CHARS - 1] + "…"
    return (
        str(letter.get("job_id") or "-"),
        str(letter.get("stage") or "-"),
        str(letter.get("code", "")),
        reason,
        str(letter.get("attempts", "")),
        _age(letter.get("age_s")),
    )


def _age(seconds: float | None) -> str:
    """A short human age: 42s, 7m, 3h, 2d."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
