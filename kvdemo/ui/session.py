"""One browser session's chat: validation of a turn, and streaming it to the chosen engines.

Kept free of Gradio so the logic is testable on its own; ui/app.py only wires it to components.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from ..client import Finished, RequestStats, TextDelta
from ..errors import EngineError, UserFacingError
from ..runtime import Runtime
from ..telemetry import LoadRecord

MAX_TEMPERATURE = 2.0
DEFAULT_TEMPERATURE = 0.0
MAX_TOKENS = 2048  # the page's "Max tokens" slider, and what /ask accepts
DEFAULT_MAX_TOKENS = 128
ANSWER_RESERVE_TOKENS = 1


@dataclass
class Turn:
    """A validated question, ready to send: the same token ids go to every engine."""

    question: str
    chunk_names: list[str]
    prompt_ids: list[int]
    engine_keys: list[str]
    temperature: float
    max_tokens: int
    note: str = ""


@dataclass
class EngineReply:
    text: str = ""
    stats: RequestStats | None = None
    error: str | None = None
    done: bool = False
    tokens: int = 0  # completion tokens received so far
    stopped: bool = False  # the turn was stopped (its stream closed) before this engine finished answering
    load: LoadRecord | None = None  # what LMCache loaded for this answer (its engine's telemetry line)


@dataclass(frozen=True)
class TtftPoint:
    """One finished answer of the session, for its TTFT chart."""

    turn: int
    key: str  # the engine's key ("lmcache", "plain")
    context_tokens: int  # the prompt tokens the engine reported
    ttft_s: float


@dataclass
class ChatState:
    """Everything one browser session owns: its histories (per engine) and the turn in flight."""

    histories: dict[str, list[dict]] = field(default_factory=dict)
    last_stats: dict[str, RequestStats] = field(default_factory=dict)
    last_loads: dict[str, LoadRecord | None] = field(default_factory=dict)  # the last turn's LMCache telemetry
    pending: Turn | None = None
    streaming: bool = False  # a turn's answers are still arriving: no second turn until they are done
    answers: dict[str, str] = field(default_factory=dict)  # the last turn's answers that finished without error
    temperature: float | None = None  # the last turn's temperature
    stopped: dict[str, int] = field(default_factory=dict)  # the last turn's answers cut by Stop: tokens received
    turn: int = 0  # turns asked so far (never reset: a turn's number stays its own)
    points: list[TtftPoint] = field(default_factory=list)  # every finished answer's TTFT, for the chart

    def add_point(self, key: str, stats: RequestStats) -> None:
        """The current turn's finished answer of engine `key`, once (callers may report it repeatedly)."""
        if not any(p.turn == self.turn and p.key == key for p in self.points):
            self.points.append(TtftPoint(self.turn, key, stats.prompt_tokens, stats.ttft_s))

    def clear(self) -> None:
        self.histories.clear()
        self.last_stats.clear()
        self.last_loads.clear()
        self.pending = None
        self.answers.clear()
        self.temperature = None
        self.stopped.clear()
        self.points.clear()


def validate_turn(runtime: Runtime, question: str, chunk_names: list[str] | None, sys_prompt: str,
                  temperature: float, max_tokens: int, engine_labels: list[str] | None,
                  uploads: Mapping[str, Sequence[int]] | None = None) -> Turn:
    """Every user mistake becomes a UserFacingError with a message saying what to do.

    `uploads`: this session's uploaded chunks (name → token ids), pickable beside the library's.
    """
    builder = runtime.builder
    assert builder is not None
    question = (question or "").strip()
    if not question:
        raise UserFacingError("Type a question first.")
    temperature = _number(temperature, float)
    if temperature is None or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise UserFacingError(f"Temperature must be between 0 and {MAX_TEMPERATURE}.")
    max_tokens = _number(max_tokens or 0, int)
    if max_tokens is None or max_tokens < 1:
        raise UserFacingError("Max tokens must be at least 1.")
    if max_tokens > MAX_TOKENS:
        raise UserFacingError(f"Max tokens must be at most {MAX_TOKENS}.")
    labels = {h.spec.label: h.spec.key for h in runtime.engines}
    keys = [labels[x] for x in (engine_labels or []) if x in labels]
    if not keys:
        raise UserFacingError("Tick at least one engine to answer.")
    names = list(chunk_names or [])
    unknown = [n for n in names if n not in runtime.library.chunks and n not in (uploads or {})]
    if unknown:
        raise UserFacingError(f"Unknown chunk {unknown[0]!r}: reload the page.")
    ids = builder.build(names, question, sys_prompt, uploads)
    limit = runtime.max_model_len
    if len(ids) + max_tokens > limit:
        raise UserFacingError(f"Context is {len(ids):,} tokens + {max_tokens} to generate, over the model's limit of "
                              f"{limit:,} (--max-model-len): deselect chunks or lower max tokens.")
    note = "" if names else "No chunks selected: answering from the question alone (nothing to reuse)."
    return Turn(question, names, ids, keys, temperature, max_tokens, note)


def _number(value, kind: type) -> float | int | None:
    """A number from the page or from /ask (where it may be any JSON value); None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        x = float(value)
    except ValueError:
        return None
    if math.isnan(x) or (kind is int and not x.is_integer()):  # NaN, or 12.5 tokens
        return None
    return int(x) if kind is int else x


async def answer_load(handle, stats: RequestStats) -> LoadRecord | None:
    """The telemetry line the LMCache engine wrote for this answer (written before its first token; read
    off the event loop). An answer that reused nothing has none: no wait then."""
    if not handle.spec.lmcache or not stats.cached_tokens:
        return None
    return await asyncio.to_thread(handle.load_record, stats.request_id, 1.0)


async def stream_turn(runtime: Runtime, turn: Turn,
                      replies: dict[str, EngineReply] | None = None) -> AsyncIterator[dict[str, EngineReply]]:
    """Yield every engine's reply so far, each time any of them advances.

    Sequential ("fair") mode runs the engines one after the other, concurrent mode at once; engines that
    fail get an error in their reply and the others carry on.

    Closing the generator early (aclose(), or cancelling the task iterating it: the page's Stop button)
    stops the turn: every engine's HTTP stream is closed before the close returns (so the engine aborts the
    request), and the replies that were still coming keep their partial text and get ``stopped``. Pass
    `replies` (a dict, filled in place) to read them after such a close.
    """
    handles = [h for h in runtime.engines if h.spec.key in turn.engine_keys]
    replies = {} if replies is None else replies
    replies.update({h.spec.key: EngineReply() for h in handles})
    queue: asyncio.Queue = asyncio.Queue()

    async def run_one(h) -> None:
        reply = replies[h.spec.key]
        client = h.client()
        try:
            async with aclosing(client.stream(turn.prompt_ids, turn.max_tokens, turn.temperature,
                                              skip_save=runtime.skip_save(h))) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        reply.text += event.text
                        reply.tokens = event.tokens or reply.tokens + 1
                    elif isinstance(event, Finished):
                        reply.stats = event.stats
                        reply.load = await answer_load(h, event.stats)
                    await queue.put(h.spec.key)
        except EngineError as exc:
            reply.error = exc.short if await _still_alive(h) else str(h.error_with_log(
                f"{h.spec.label} crashed (exit code {h.process.proc.returncode}): use its Restart button."))
        except UserFacingError as exc:
            reply.error = str(exc)
        finally:
            reply.done = True
            await client.close()
            await queue.put(h.spec.key)

    if runtime.sequential:
        async def run_all() -> None:
            for h in handles:
                await run_one(h)
        tasks = [asyncio.create_task(run_all())]
    else:
        tasks = [asyncio.create_task(run_one(h)) for h in handles]
    last_yield = 0.0
    try:
        while not all(r.done for r in replies.values()):
            await queue.get()
            now = time.monotonic()
            if now - last_yield >= 0.05 or all(r.done for r in replies.values()):
                last_yield = now
                yield replies
        yield replies
    finally:
        for reply in replies.values():
            if not reply.done and reply.stats is None and reply.error is None:
                reply.stopped = True  # closed early (Stop): still answering, or not started yet (sequential)
        for t in tasks:
            t.cancel()
        # Wait for each engine's stream to be closed (run_one's cleanup), not just asked to: the request is
        # aborted now, not left to finish in the background.
        if tasks:
            await asyncio.wait(tasks)


async def _still_alive(handle, grace_s: float = 3.0) -> bool:
    """A broken stream usually means the engine died; give the OS a moment to reap it before deciding."""
    if handle.process is None:
        return True
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not handle.process.alive():
            return False
        await asyncio.sleep(0.1)
    return handle.process.alive()


def speedup(stats: dict[str, RequestStats]) -> float | None:
    fast, slow = stats.get("lmcache"), stats.get("plain")
    if fast is None or slow is None or fast.ttft_s <= 0:
        return None
    return slow.ttft_s / fast.ttft_s


def answer_agreement(tokenizer, text_a: str, text_b: str) -> tuple[int, int]:
    """(k, m): how many leading token ids the two answers share, and the longer answer's token count."""
    a = tokenizer.encode(text_a, add_special_tokens=False)
    b = tokenizer.encode(text_b, add_special_tokens=False)
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k, max(len(a), len(b))
