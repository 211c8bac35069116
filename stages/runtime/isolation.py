"""A redelivered message runs alone, so a message that kills its worker takes no other down.

A worker that dies (`kill -9`, the OOM killer, a segfault in a native library) hands back
every message it held, and RabbitMQ counts a failed delivery against each of them
(`x-delivery-count`; `x-acquired-count` on 4.3+). With a prefetch of N, a poison message would
bring N-1 innocent ones a step closer to their delivery limit with every worker it kills,
until they were set aside as `worker_crashed` beside it. So the runner
(stages/runtime/runner.py) never runs a *suspect*, a delivery that was handed out before and
never settled, beside any other delivery:

1. it stops taking deliveries (its consumers are cancelled);
2. the handlers already running finish; every other delivery it holds is *parked* (`Park`,
   stages/runtime/outcome.py): a copy goes to the back of its own queue, then it is acked;
3. the suspect runs alone: if it kills the worker, it is the only message handed back;
4. the runner consumes again, on fresh consumers.

A poison message therefore kills at most `delivery_limit` workers (the first time beside
others, then alone, until `refuse` sets it aside), and an innocent message is handed back at
most once for it. A parked copy is a new message to RabbitMQ, whose count starts again: the
deaths of the copies before it ride along in `DEATHS_HEADER`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stages.infra.broker import header_int

# How often earlier copies of a message were handed back unsettled (carried by parking and
# retries; RabbitMQ counts only the copy it holds).
DEATHS_HEADER = "x-sluice-deaths"
# What RabbitMQ counts per copy: failed deliveries (3.x counts every hand-back here; 4.3+
# only rejections) and, on 4.3+, every hand-back, a worker's death included.
BROKER_COUNTS = ("x-delivery-count", "x-acquired-count")


def deaths(headers: Mapping[str, Any] | None) -> int:
    """How often a message was in hand and not settled: by its worker's death, a lost
    connection, a drain that ran out of time."""
    counted = max(header_int(headers, name, 0) for name in BROKER_COUNTS)
    return header_int(headers, DEATHS_HEADER, 0) + counted


def moved_headers(headers: Mapping[str, Any] | None, deaths_so_far: int) -> dict[str, Any]:
    """The headers a delivery is published again with (parked, or sent to a retry tier): its
    own, its deaths carried, and none of the broker's counts, which a new copy would keep
    as given until the broker first counts it, and then overwrite."""
    moved = {k: v for k, v in (headers or {}).items() if k not in BROKER_COUNTS}
    moved.pop(DEATHS_HEADER, None)
    if deaths_so_far:
        moved[DEATHS_HEADER] = deaths_so_far
    return moved
