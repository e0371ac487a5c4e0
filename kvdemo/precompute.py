"""Warm the LMCache engine: store the KV of the system prompt and of every chunk, one request each.

Each request is `[BOS] + sys` or `[BOS] + SEP + chunk` with max_tokens=1, so LMCache stores exactly one
new segment; afterwards any order or subset of these chunks is served from cache.

Then one warm-up request per engine (stored nowhere: kvdemo.scenarios.blend.warm_up_prompts), so that the
user's first question does not show a cold-start artefact instead of what blending does. It decodes one
token as well (max_tokens=2): a question is the first request of an engine's life that decodes.
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
    warm_ups: int = 0  # requests of the plan that only warm an engine up (counted in total, not segments)
    warm_up_s: float = 0.0

    @property
    def finished(self) -> bool:
        return self.total > 0 and self.done >= self.total

    def line(self) -> str:
        if self.error:
            return f"{self.what} failed: {self.error}"
        if self.total == 0:
            return f"{self.what} not started"
        if self.finished:
            if self.what != "precompute":
                return f"preheated with {self.total} requests in {self.seconds:.2f} s"
            warm = f" (+ warm-up {self.warm_up_s:.2f} s)" if self.warm_ups else ""
            return f"precomputed {self.total - self.warm_ups} segments in {self.seconds - self.warm_up_s:.2f} s{warm}"
        return f"{self.what} {self.done}/{self.total}…"


@dataclass
class PrecomputeRequest:
    client: EngineClient
    ids: list[int]
    warm_up: bool = False  # True: only makes the engine's first answer warm (reported apart from segments)
    skip_save: bool = False  # ask LMCache not to store it (warm-ups of the LMCache engine)


async def precompute(requests: list[PrecomputeRequest], progress: PrecomputeProgress,
                     on_step: Callable[[PrecomputeProgress], None] | None = None) -> PrecomputeProgress:
    """Send each request (max_tokens=1: KV is stored as a side effect; 2 for warm-ups); report progress."""
    progress.total = len(requests)
    progress.warm_ups = sum(r.warm_up for r in requests)
    start = time.perf_counter()
    for r in requests:
        t0 = time.perf_counter()
        await r.client.complete(r.ids, max_tokens=2 if r.warm_up else 1, skip_save=r.skip_save)
        took = time.perf_counter() - t0
        progress.per_request_s.append(took)
        if r.warm_up:
            progress.warm_up_s += took
        progress.done += 1
        progress.seconds = time.perf_counter() - start
        if on_step:
            on_step(progress)
    log.info("precompute: %d requests in %.2f s", progress.total, progress.seconds)
    return progress
