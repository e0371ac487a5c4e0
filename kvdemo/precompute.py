"""Warm the LMCache engine: store the KV of the system prompt and of every chunk, one request each.

Each request is `[BOS] + sys` or `[BOS] + SEP + chunk` with max_tokens=1, so LMCache stores exactly one
new segment; afterwards any order or subset of these chunks is served from cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .client import EngineClient

log = logging.getLogger(__name__)


@dataclass
class PrecomputeProgress:
    done: int = 0
    total: int = 0
    seconds: float = 0.0
    error: str | None = None
    per_request_s: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.total > 0 and self.done >= self.total

    def line(self) -> str:
        if self.error:
            return f"precompute failed: {self.error}"
        if self.total == 0:
            return "precompute not started"
        if self.finished:
            return f"precomputed {self.total} segments in {self.seconds:.2f} s"
        return f"precomputing {self.done}/{self.total}…"


async def precompute(client: EngineClient, prompts: list[list[int]], progress: PrecomputeProgress,
                     on_step: Callable[[PrecomputeProgress], None] | None = None) -> PrecomputeProgress:
    """Send each prompt with max_tokens=1 (KV is stored as a side effect); report progress per request."""
    progress.total = len(prompts)
    start = time.perf_counter()
    for ids in prompts:
        t0 = time.perf_counter()
        await client.complete(ids, max_tokens=1)
        progress.per_request_s.append(time.perf_counter() - t0)
        progress.done += 1
        progress.seconds = time.perf_counter() - start
        if on_step:
            on_step(progress)
    log.info("precompute: %d requests in %.2f s", progress.total, progress.seconds)
    return progress
