"""The `sluice` command line: parse arguments, hand each subcommand to its module."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contracts.errors import SluiceError
from gateway.cli import dlq as dlq_cli
from gateway.cli import reindex as reindex_cli

if TYPE_CHECKING:
    from contracts.settings import Settings


def _settings() -> Settings:
    from pydantic import ValidationError

    from contracts.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            str(e.get("msg", e)).removeprefix("Value error, ") for e in exc.errors()
        )
        raise SluiceError(f"invalid SLUICE_* setting: {problems}", code="usage_error") from exc


def _checked_settings() -> Settings:
    """Settings for a process that runs part of the pipeline: every cross-field check and
    the pipeline itself (stage names, plug-in modules) pass before anything starts."""
    settings = _settings()
    settings.check()
    return settings


def _process_names() -> tuple[str, ...]:
    """Every stage a process can run: the pipeline's, then the side stages (webhook)."""
    from contracts.pipeline import DEFAULT_STAGE_NAMES, SIDE_STAGES

    try:
        return tuple(spec.name for spec in _settings().pipeline.processes)
    except SluiceError:
        return (*DEFAULT_STAGE_NAMES, *(spec.name for spec in SIDE_STAGES))


def _statuses() -> tuple[str, ...]:
    from contracts.pipeline import default_pipeline

    try:
        return _settings().pipeline.statuses
    except SluiceError:
        return default_pipeline().statuses


def _default_url() -> str:
    settings = _settings()
    # A server bound to every interface is still reached through loopback.
    host = "127.0.0.1" if settings.host in ("", "0.0.0.0") else settings.host
    host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
    return f"http://{host}:{settings.port}"


class _HelpWithDefaults(argparse.HelpFormatter):
    """Shows an option's default in its --help, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        if shown and "%(default)" not in help_text and action.option_strings:
            help_text += " (default: %(default)s)"
        return help_text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.http.app import serve

    serve(_checked_settings())
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from stages.runtime.worker import run_stage

    run_stage(args.name, _checked_settings())
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from gateway.cli.ingest import UsageError
    from gateway.cli.supervisor import default_children, run_supervisor

    # Fail here, once, rather than in every child in a restart loop.
    settings = _checked_settings()
    # The pipeline's stages, then the side stages (webhook): `sluice up` runs them all.
    names = tuple(spec.name for spec in settings.pipeline.processes)
    stages = [name.strip() for item in args.stages for name in item.split(",") if name.strip()]
    unknown = sorted(set(stages) - set(names))
    if unknown:
        raise UsageError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    chosen = [stage for stage in names if stage in stages] if args.stages else list(names)
    if args.no_gateway and not chosen:
        raise UsageError("nothing to run: --no-gateway and no stages")
    if not args.no_gateway:
        from gateway.http.services import refuse_open_exposure

        refuse_open_exposure(settings)
    return run_supervisor(default_children(chosen, gateway=not args.no_gateway))


def _cmd_ingest(args: argparse.Namespace) -> int:
    from gateway.cli.ingest import run_ingest

    return run_ingest(
        args.paths,
        url=args.url or _default_url(),
        api_key=args.api_key,
        collection=args.collection,
        concurrency=args.concurrency,
        priority=args.priority,
    )


def _cmd_reindex(args: argparse.Namespace) -> int:
    return reindex_cli.run_reindex(args, args.url or _default_url())


def _cmd_search(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from gateway.cli.client import SluiceClient

    async def fetch() -> list[dict[str, Any]]:
        async with SluiceClient(args.url or _default_url(), args.api_key) as client:
            return await client.search(args.query, collection=args.collection, k=args.k)

    results = asyncio.run(fetch())
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    # soft_wrap: a terminal wraps long lines itself, and piped output is never cut mid-sentence
    # at rich's 80-column default.
    console = Console(highlight=False, soft_wrap=True)
    if not results:
        console.print(f"no results in collection {escape(args.collection)!r}")
    for rank, hit in enumerate(results, start=1):
        page = f"  p. {hit['page']}" if hit.get("page") is not None else ""
        text = " ".join(str(hit.get("text", "")).split())
        text = text if len(text) <= 400 else text[:399] + "…"
        console.print(
            f"[bold]{rank}.[/] [green]{hit['score']:.3f}[/]  "
            f"[cyan]{escape(str(hit['filename']))}[/]{page}"
        )
        console.print(f"    {escape(text)}\n")
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    from gateway.cli.client import SluiceClient
    from gateway.cli.tables import print_table

    async def fetch() -> dict[str, Any]:
        async with SluiceClient(args.url or _default_url(), args.api_key) as client:
            status = "failed" if args.failed else args.status
            return await client.jobs(
                status=status,
                collection=args.collection,
                limit=args.limit,
                cursor=args.cursor,
                stalled=True if args.stalled else None,
            )

    page = asyncio.run(fetch())
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    header = ("job id", "filename", "collection", "status", "chunks", "updated (UTC)", "error")
    rows = [_job_row(job) for job in page["jobs"]]
    print_table(header, rows, empty="no jobs")
    if page.get("next_cursor"):
        print(f"more: sluice jobs --cursor {page['next_cursor']}")
    return 0


def _job_row(job: dict[str, Any]) -> tuple[str, ...]:
    progress = job.get("progress") or {}
    total = progress.get("chunks_total")
    chunks = f"{progress.get('chunks_indexed', 0)}/{total}" if total is not None else "-"
    error = (job.get("error") or {}).get("code", "")
    updated = str(job.get("updated_at", ""))[:19].replace("T", " ")
    # In the status column, so a stalled job stands out in the table and to grep alike.
    status = f"{job['status']} (stalled)" if job.get("stalled") else job["status"]
    fields = (job["job_id"], job["filename"], job["collection"], status, chunks)
    return (*(str(field) for field in fields), updated, str(error))


def _cmd_status(args: argparse.Namespace) -> int:
    from gateway.cli.status import run_status

    return run_status(args, args.url or _default_url())


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _client_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="gateway URL (default http://SLUICE_HOST:SLUICE_PORT)")
    common.add_argument(
        "--api-key",
        default=os.environ.get("SLUICE_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: $SLUICE_API_KEY)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The `sluice` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="sluice", description="Document ingestion: upload, parse, chunk, embed, index."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _client_options()

    def add(name: str, handler: Callable[[argparse.Namespace], int], **kw: Any) -> Any:
        # Every option's default shows in its --help.
        kw.setdefault("formatter_class", _HelpWithDefaults)
        kw.setdefault("description", kw.get("help"))
        command = sub.add_parser(name, **kw)
        command.set_defaults(handler=handler)
        return command

    add("gateway", _cmd_gateway, help="run the HTTP gateway")
    stage = add("stage", _cmd_stage, help="run one stage process")
    stage.add_argument(
        "name", choices=_process_names(), help="a stage of SLUICE_STAGES, or a side stage"
    )
    up = add("up", _cmd_up, help="run the gateway and every stage, restarting what dies")
    up.add_argument(
        "--stages", action="append", default=[], help="stages to run, e.g. parse,chunk (all)"
    )
    up.add_argument("--no-gateway", action="store_true", help="run only the stages")

    ingest = add("ingest", _cmd_ingest, parents=[common], help="upload files and folders")
    ingest.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="files, and folders to upload every non-hidden file under",
    )
    ingest.add_argument("--collection", default="default", help="the collection to add to")
    ingest.add_argument("--concurrency", type=_positive_int, default=4, help="uploads at once")
    ingest.add_argument(
        "--priority",
        choices=("interactive", "bulk"),
        help="the lane: default bulk when a folder is named, interactive for files alone",
    )

    search = add("search", _cmd_search, parents=[common], help="search indexed chunks")
    search.add_argument("query", metavar="QUERY", help="what to look for, in plain words")
    search.add_argument("--collection", default="default", help="the collection to search")
    search.add_argument("-k", type=_positive_int, default=5, help="how many results")
    search.add_argument("--json", action="store_true", help="print the raw JSON")

    jobs = add("jobs", _cmd_jobs, parents=[common], help="list jobs, newest first")
    jobs.add_argument("--failed", action="store_true", help="same as --status failed")
    jobs.add_argument("--status", choices=_statuses())
    jobs.add_argument("--collection")
    jobs.add_argument("--limit", type=_positive_int)
    jobs.add_argument("--cursor", help="continue a previous listing")
    jobs.add_argument(
        "--stalled", action="store_true", help="only jobs with no progress for too long"
    )
    jobs.add_argument("--json", action="store_true", help="print the raw JSON")

    status = add("status", _cmd_status, parents=[common], help="stages, lanes and workers")
    status.add_argument(
        "--watch",
        nargs="?",
        type=_positive_float,
        const=2.0,
        metavar="SECONDS",
        help="redraw every SECONDS (2 if not given) until Ctrl-C",
    )
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    reindex_cli.configure(
        add(
            "reindex",
            _cmd_reindex,
            parents=[common],
            help="re-index a collection with new chunk sizes or model, and follow it",
        ),
        _positive_int,
    )

    dlq = sub.add_parser("dlq", help="list or replay dead letters")
    dlq_cli.configure(dlq, common, lambda args: args.url or _default_url(), _process_names())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sluice` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except SluiceError as exc:
        # Matched by code so that `sluice stage` need not import the client modules.
        if exc.code == "usage_error":
            print(f"sluice {args.command}: error: {exc.message}", file=sys.stderr)
            return 2
        if exc.code == "gateway_unreachable":
            print(exc.message, file=sys.stderr)
        else:
            print(f"sluice {args.command}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
