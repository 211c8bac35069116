"""Pipeline overhead: Sluice with a zero-cost embedder against a plain aio-pika chain."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from broker import BrokerHandle

from bench.corpus import Document
from bench.pika_chain import PlainRun, plain_chain
from bench.prepare import Plan
from bench.procs import answers, child_env, free_port, spawn, stop, wait_for
from bench.sluice_run import EndToEnd, end_to_end


@dataclass(frozen=True)
class Overhead:
    """The same data-plane messages through Sluice (real parse, chunk, index) and through
    four pass-through consumers."""

    sluice: EndToEnd
    messages: int
    plain: PlainRun

    @property
    def sluice_messages_per_s(self) -> float:
        """Sluice's data-plane messages (upload, parsed, chunk and embedded batches) per second."""
        return self.messages / self.sluice.wall_s

    @property
    def ratio(self) -> float:
        """Sluice's message rate as a fraction of the plain chain's."""
        return self.sluice_messages_per_s / self.plain.messages_per_s


def overhead(
    broker: BrokerHandle,
    root: Path,
    docs: list[Document],
    plans: list[Plan],
    *,
    clients: int,
    deadline_s: float,
) -> Overhead:
    """Run the corpus through Sluice with the zero-cost endpoint, then the plain chain."""
    port = free_port()
    log = root / "zero-embedder.log"
    endpoint = spawn(
        [sys.executable, "-m", "bench.zero_embedder", "--port", str(port)], log, child_env()
    )
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/health"), 60, "zero embedder", log)
        sluice = end_to_end(
            broker,
            root / "sluice",
            docs,
            clients=clients,
            deadline_s=deadline_s,
            SLUICE_EMBED_URL=f"http://127.0.0.1:{port}/v1",
        )
    finally:
        stop([endpoint])
    plain = plain_chain(broker.amqp_url, plans, deadline_s)
    return Overhead(sluice=sluice, messages=sum(p.messages for p in plans), plain=plain)
