"""What every end-to-end phase reports: how much went through, and in how long."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Throughput:
    """Documents and chunks indexed over `wall_s`, the span each phase times (its docstring
    says which)."""

    documents: int
    chunks: int
    wall_s: float

    @property
    def docs_per_s(self) -> float:
        """Documents indexed per second."""
        return self.documents / self.wall_s

    @property
    def chunks_per_s(self) -> float:
        """Chunks indexed per second."""
        return self.chunks / self.wall_s
