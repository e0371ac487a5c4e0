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
    what: str = "precompute"  # "preheat" in the share scenario: warm every engine, cache nothing useful

    @property
    def finished(self) -> bool:
        return self.total > 0 and self.done >= self.total

    def line(self) -> str:
        if self.error:
            return f"{self.what} failed: {self.error}"
        if self.total == 0:
            return f"{self.what} not started"
        if self.finished:
            done = "precomputed {} segments" if self.what == "precompute" else "preheated with {} requests"
            return f"{done.format(self.total)} in {self.seconds:.2f} s"
        return f"{self.what} {self.done}/{self.total}…"


async def precompute(requests: list[tuple[EngineClient, list[int]]], progress: PrecomputeProgress,
                     on_step: Callable[[PrecomputeProgress], None] | None = None) -> PrecomputeProgress:
    """Send each (engine, prompt) with max_tokens=1 (KV is stored as a side effect); report progress."""
    progress.total = len(requests)
    start = time.perf_counter()
    for client, ids in requests:
        t0 = time.perf_counter()
        await client.complete(ids, max_tokens=1)
        progress.per_request_s.append(time.perf_counter() - t0)
        progress.done += 1
        progress.seconds = time.perf_counter() - start
        if on_step:
            on_step(progress)
    log.info("precompute: %d requests in %.2f s", progress.total, progress.seconds)
    return progress
