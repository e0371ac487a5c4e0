"""What every bench protocol is made of: the `BenchCases` a scenario is measured by, fresh chunk text, one timed
request, and an engine's log (cases.py: blend; share_cases.py: share)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..client import EngineClient, RequestStats
from ..engine_handle import EngineHandle
from ..prompts import PromptBuilder
from ..runtime import Runtime

CHUNKS_PER_PROMPT = 8


def _no_fields(runtime: Runtime) -> dict:
    return {}


def _no_annotations(runtime: Runtime, repeats: list[dict]) -> None:
    return None


@dataclass(frozen=True)
class BenchCases:
    """A scenario's TTFT benchmark protocol; kvdemo.bench runs it for each context size and repeat."""

    repeat: Callable[[Runtime, int, int, str], Awaitable[dict]]  # (runtime, context, decode tokens, tag) → repeat
    summarize: Callable[[int, list[dict]], dict]  # (context target, repeats) → one case of the result
    ttft_keys: tuple[str, ...]  # of a repeat, printed after each one
    requests: str  # how the requests are sent (after "one at a time; " in the result file)
    case_line: Callable[[dict], str]  # one case of the result, for the terminal
    plot: Callable[[dict, Path, Any], None]  # (result, png, matplotlib.pyplot): the result's figure
    extra_fields: Callable[[Runtime], dict] = field(default=_no_fields)  # more result fields, after the evidence
    # adds figures to a context's repeats before they are summarized (e.g. from the engine logs)
    annotate: Callable[[Runtime, list[dict]], None] = field(default=_no_annotations)
    traceable: bool = False  # --trace-contexts can trace the LMCache engine's blend


def synthetic_chunks(builder: PromptBuilder, n: int, tokens_each: int, tag: str) -> list[list[int]]:
    """n chunks of ~tokens_each ids: a unique nonce line, then real corpus text (offset per chunk)."""
    pool = [t for name in builder.library.chunks for t in builder.chunk_ids(name)]
    chunks = []
    for i in range(n):
        nonce = list(builder.tokenizer.encode(f"Revision {tag}-{i}: ", add_special_tokens=False))
        body_len = max(1, tokens_each - len(nonce))
        start = (i * len(pool) // n) % len(pool)
        body = (pool[start:] + pool)[:body_len]
        chunks.append(nonce + body)
    return chunks


async def ask(client: EngineClient, ids: list[int], max_tokens: int = 1, **kw) -> RequestStats:
    _, stats = await client.complete(ids, max_tokens=max_tokens, temperature=0.0, **kw)
    return stats


def engine_log_lines(engine: EngineHandle) -> list[str]:
    """The engine's log (empty for an attached engine: its log is elsewhere)."""
    proc = engine.process
    if proc is None:
        return []
    return proc.log_path.read_text(errors="replace").splitlines()
