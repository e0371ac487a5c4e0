"""`RuntimeView`: the little of the running demo (kvdemo.runtime.Runtime) that its helpers read.

The scenarios plan their precompute through it and the upload budget sizes itself with it. It lives below
the runtime, so that they can name it without importing the runtime (imports stay one-way).
"""

from __future__ import annotations

from typing import Protocol

from .config import Settings
from .engine_handle import EngineHandle
from .prompts import ChunkLibrary, PromptBuilder


class RuntimeView(Protocol):
    """The settings, the shipped chunks, the prompt builder (None before start) and the engines."""

    settings: Settings
    library: ChunkLibrary
    builder: PromptBuilder | None
    engines: list[EngineHandle]

    @property
    def max_model_len(self) -> int: ...

    @property
    def lmcache_engine(self) -> EngineHandle: ...

    def precompute_prompts(self) -> list[list[int]]:
        """``[BOS] + sys`` and ``[BOS] + SEP + chunk`` for every shipped chunk: what the precompute stores."""
        ...
