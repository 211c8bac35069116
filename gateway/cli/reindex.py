"""`sluice reindex COLLECTION`: re-index a collection with new chunk sizes or model, and
follow it with a progress bar until it switched, failed or was cancelled."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `sluice stage` never loads the client's modules
    from rich.console import Console

    from gateway.cli.client import SluiceClient

_ENDED = ("done", "cancelled", "failed")


def configure(
    command: argparse.ArgumentParser, positive_int: Callable[[str], int]
) -> argparse.ArgumentParser:
    """The subcommand's arguments."""
    command.add_argument("collection", metavar="COLLECTION", help="the collection to re-index")
    command.add_argument("--chunk-max-tokens", type=positive_int, help="the new chunk size")
    command.add_argument("--chunk-overlap-tokens", type=int, help="the new overlap between chunks")
    command.add_argument(
        "--model", help="the deployment's model name, or a sentence-transformers directory"
    )
    command.add_argument("--cancel", action="store_true", help="cancel the reindex under way")
    command.add_argument(
        "--no-follow", action="store_true", help="start it and return (exit 0 once accepted)"
    )
    command.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    return command


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The request body: the settings the command line names."""
    asked = {
        "chunk_max_tokens": args.chunk_max_tokens,
        "chunk_overlap_tokens": args.chunk_overlap_tokens,
        "model": args.model,
    }
    return {key: value for key, value in asked.items() if value is not None}


def run_reindex(args: argparse.Namespace, url: str) -> int:
    """Start (or cancel) a reindex and follow it; 0 once it is done, 1 otherwise."""
    return asyncio.run(_run(args, url))


async def _run(args: argparse.Namespace, url: str) -> int:
    from rich.console import Console
    from rich.markup import escape

    from gateway.cli.client import SluiceClient

    console = Console(highlight=False, soft_wrap=True)
    name = args.collection
    async with SluiceClient(url, args.api_key, poll_interval_s=args.poll) as client:
        if args.cancel:
            cancelled = await client.cancel_reindex(name)
            console.print(f"reindex {cancelled['reindex_id']} of {escape(name)} cancelled")
            return 0
        started = await client.start_reindex(name, settings_of(args))
        chosen = started["settings"]
        console.print(
            f"re-indexing {escape(name)} into generation {started['generation']} "
            f"(chunks of {chosen['chunk_max_tokens']} tokens, overlap "
            f"{chosen['chunk_overlap_tokens']}, model {escape(str(chosen['model']))}); "
            f"reindex {started['reindex_id']}"
        )
        if args.no_follow:
            return 0
        reindex = await _follow(client, console, name, started)
    state = reindex["status"]
    if state == "done":
        console.print(
            f"[green]done[/]: {escape(name)} now answers from generation {reindex['generation']}"
        )
        return 0
    console.print(
        f"[bold red]{state}[/]: {escape(name)} still answers from generation "
        f"{reindex['from_generation']}"
    )
    return 1


async def _follow(
    client: SluiceClient, console: Console, name: str, started: dict[str, Any]
) -> dict[str, Any]:
    """Poll the collection until its reindex ended, drawing its progress."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    reindex = started
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(
            "documents", total=max(1, reindex["documents_total"]), state=reindex["status"]
        )
        while reindex["status"] not in _ENDED:
            await asyncio.sleep(client.poll_interval_s)
            found = (await client.collection(name)).get("reindex")
            if not found or found["reindex_id"] != started["reindex_id"]:
                # Another reindex replaced it (this one was cancelled and a new one began).
                return {**reindex, "status": "cancelled"}
            reindex = found
            bar.update(
                task,
                total=max(1, reindex["documents_total"]),
                completed=reindex["documents_done"],
                state=reindex["status"],
            )
    return reindex
