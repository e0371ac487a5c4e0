"""The blend page's event handlers: plain functions of the Runtime and the event's inputs.

ui/app.py binds each to the runtime (`bind`) and wires it to the page; tests call them directly. Per-session
data comes in and goes out as the page's gr.State values (ChatState, Uploads); the Runtime is shared by
nature. A turn is two steps, as on FastChat's arena page: `prepare` (input, instant) then `stream` (answers).
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Callable
from contextlib import aclosing

import gradio as gr

from .. import uploads as byo
from ..errors import UserFacingError
from ..runtime import Runtime
from .chart import Benchmark, chart_frame, load_benchmark
from .labels import PANES, agreement_markdown, pane_stats_markdown, reply_message, speedup_markdown
from .session import ChatState, EngineReply, Turn, stream_turn, validate_turn

STOP_WAIT_S = 10.0  # how long Stop waits for Gradio's cancel to end the running answers (it takes milliseconds)


def bind(fn: Callable, runtime: Runtime) -> Callable:
    """`fn` with the runtime as its first argument, named as `fn` (Gradio names an event after its function)."""
    bound = functools.partial(fn, runtime)
    bound.__name__ = fn.__name__  # type: ignore[attr-defined]
    return bound


@functools.cache
def reference_benchmark() -> Benchmark | None:
    """The committed benchmark curve (read once: the same for every session); None if the file is missing."""
    return load_benchmark()


def chart(runtime: Runtime, state: ChatState):
    """The TTFT chart's frame: this session's answers next to the benchmark curve."""
    return chart_frame(state, reference_benchmark(), bool(runtime.settings.simulate))


def chunk_choices(runtime: Runtime, up: byo.Uploads | None = None) -> list[tuple[str, str]]:
    """The chunk pickers' (label, name) options: the library's chunks, then this session's uploaded ones."""
    assert runtime.builder is not None
    titles = runtime.library.titles()
    library = [(f"{titles[n]}  ({len(runtime.builder.chunk_ids(n)):,} tok)", n) for n in runtime.library.chunks]
    return library + [(f"{c.name}  ({len(c.ids):,} tok)", c.name) for c in (up.chunks.values() if up else ())]


def context_info(runtime: Runtime, names: list[str] | None, sys_prompt: str,
                 up: byo.Uploads | None = None) -> tuple[str, str]:
    """The context's size and order (markdown), and its text with visible separators."""
    builder, library = runtime.builder, runtime.library
    assert builder is not None
    titles = library.titles()
    up = up or byo.Uploads()
    names = [x for x in (names or []) if x in library.chunks or x in up.chunks]
    n = builder.context_tokens(names, sys_prompt, up.ids())
    limit = runtime.max_model_len
    over = f" — over the limit of {limit:,} (--max-model-len)!" if n >= limit else ""
    order = " → ".join(titles.get(x, x) for x in names) or "(no chunks: question only)"
    return (f"**Context: {n:,} tokens**, {len(names)} chunks{over}  \nOrder: {order}",
            builder.display_text(names, sys_prompt, up.texts()))


def move(names: list[str] | None, target: str | None, step: int) -> list[str]:
    names = list(names or [])
    if target in names:
        i = names.index(target)
        j = max(0, min(len(names) - 1, i + step))
        names[i], names[j] = names[j], names[i]
    return names


def shuffled(names: list[str] | None) -> list[str]:
    names = list(names or [])
    random.shuffle(names)
    return names


def chats(state: ChatState) -> list[list[dict]]:
    return [list(state.histories.get(k, [])) for k in PANES]


def prepare(runtime: Runtime, question, names, sys_prompt, temperature, max_tokens, engines, state: ChatState,
            up: byo.Uploads | None = None):
    """The first step of a turn: check the input, add the question to the chats; `stream` answers it.

    Returns (state, notice, *chats, question box).
    """
    if state.streaming or state.pending is not None:  # a new turn would write into this one's messages
        busy = "⚠️ Still answering the previous question: ask again when it is done (or Clear chat)."
        return state, busy, *chats(state), gr.update()
    try:
        evicted = byo.check_evicted(runtime, up, names)  # uploads evicted by the engine-wide upload budget
        turn = validate_turn(runtime, question, names, sys_prompt, temperature, max_tokens, engines,
                             up.ids() if up else None)
    except UserFacingError as exc:
        return state, f"⚠️ {exc}", *chats(state), gr.update()
    notes = [turn.note] if turn.note else []
    if evicted:
        notes.append(f"⚠️ {evicted}.")
    if not runtime.progress.finished:
        notes.append(f"Precompute still running ({runtime.progress.line()}): 🚀 may not reuse every chunk yet.")
    for key in turn.engine_keys:
        state.histories.setdefault(key, []).extend([
            {"role": "user", "content": turn.question},
            {"role": "assistant", "content": "…"},
        ])
        state.last_stats.pop(key, None)
        state.last_loads.pop(key, None)
    state.answers.clear()
    state.stopped.clear()
    state.temperature = turn.temperature
    state.turn += 1
    state.pending = turn
    return state, " ".join(notes), *chats(state), ""


def record(runtime: Runtime, state: ChatState, turn: Turn, replies: dict[str, EngineReply],
           stopped: bool = False) -> None:
    """Write the replies so far into the session's chat; `stopped`: the turn was cut short (Stop)."""
    for key in turn.engine_keys:
        reply = replies.get(key)
        if reply is None:  # stopped before this engine was asked
            if not stopped:
                continue
            reply = EngineReply(stopped=True)
        history = state.histories.get(key)
        if not history:
            continue  # "Clear chat" was clicked while this turn streamed
        history[-1] = {"role": "assistant", "content": reply_message(reply, runtime)}
        if reply.stats and not reply.error:
            state.last_stats[key] = reply.stats
            state.last_loads[key] = reply.load
            if not reply.stopped:
                state.add_point(key, reply.stats)
        if reply.stopped:
            state.stopped[key] = reply.tokens
        elif reply.done and not reply.error:
            state.answers[key] = reply.text


def outputs(runtime: Runtime, state: ChatState) -> tuple:
    """(*chats, *stats lines, speedup badge, agreement, chart) of the session as it is now."""
    # The chart's frame goes with every step: Gradio streams diffs, so an unchanged chart costs nothing.
    return (*chats(state), *[pane_stats_markdown(state, k, runtime) for k in PANES],
            speedup_markdown(state, runtime), agreement_markdown(state, runtime), chart(runtime, state))


async def stream(runtime: Runtime, sys_prompt: str, state: ChatState):
    """The second step of a turn: stream the prepared turn's answers; yields (*outputs, state)."""
    turn = state.pending
    if turn is None:
        return
    state.pending = None
    state.streaming = True
    replies: dict[str, EngineReply] = {}
    finished = False
    try:
        try:
            await runtime.ensure_sys_prompt_cached(sys_prompt)
        except UserFacingError:
            pass  # the LMCache engine's own reply will carry the error
        async with aclosing(stream_turn(runtime, turn, replies)) as updates:
            async for _ in updates:
                record(runtime, state, turn, replies)
                yield (*outputs(runtime, state), state)
        finished = True
    finally:
        # Stop cancels this event: Gradio cancels the task iterating this generator (CancelledError at its
        # current await) or closes it at its `yield` (GeneratorExit); either way `aclosing` has closed
        # stream_turn, which closed both engine streams. Keep the partial answers, marked stopped; the
        # Stop button's own event shows them (a cancelled generator yields nothing more).
        if not finished:
            record(runtime, state, turn, replies, stopped=True)
        state.streaming = False


async def stop(runtime: Runtime, state: ChatState):
    """The Stop button, after Gradio has cancelled `stream` (cancels=): show the stopped answers.

    Both events start on the same click, so the cancel may land a moment after this runs: wait for it.
    A turn prepared but not yet streaming is dropped here. With nothing in flight, this shows the chat as
    it is (nothing changes).
    """
    deadline = time.monotonic() + STOP_WAIT_S
    while state.streaming and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.streaming:
        return tuple(gr.skip() for _ in range(2 * len(PANES) + 3))
    if state.pending is not None:  # asked, but its answers had not begun: `stream` will find nothing to do
        turn, state.pending = state.pending, None
        record(runtime, state, turn, {}, stopped=True)
    return outputs(runtime, state)


def clear(runtime: Runtime, state: ChatState):
    """Clear chat: returns (state, *chats, *stats lines, badge, agreement, chart)."""
    state.clear()
    return state, [], [], "", "", "", "", chart(runtime, state)


def restart(runtime: Runtime, key: str) -> str:
    """Blocking (runs in Gradio's worker thread): the engine is back, or the message says why not."""
    handle = next(h for h in runtime.engines if h.spec.key == key)
    label = handle.spec.label
    try:
        seconds = runtime.restart_engine(key)
    except UserFacingError as exc:
        return f"⚠️ Restart of {label} failed: {exc}"
    again = " and its chunks precomputed again" if runtime.scenario.restart_redoes_precompute(handle) else ""
    return f"{label} restarted in {seconds:.1f} s{again}."


async def add_text(runtime: Runtime, stem: str, text: str, up: byo.Uploads, names: list[str] | None = None,
                   target: str | None = None):
    """Split one upload, precompute its chunks on 🚀, then offer them in this session's pickers (uploads.py
    `add_upload`: limits, the engine-wide upload budget, evictions).

    Yields (status, chunks dropdown, move dropdown, uploads state); `names`/`target`: the pickers' values,
    kept but for chunks evicted from this session. Errors leave everything else as it is.
    """
    async for step in byo.add_upload(runtime, up, stem, text):
        if not step.changed:
            yield step.line, gr.update(), gr.update(), up
            continue
        options = chunk_choices(runtime, up)
        kept = byo.kept_selection(up, names, runtime.library.chunks)
        target = target if target in {n for _, n in options} else None
        yield (step.line, gr.update(choices=options, value=kept), gr.update(choices=options, value=target), up)


async def add_file(runtime: Runtime, path, up: byo.Uploads, names: list[str] | None = None,
                   target: str | None = None):
    """The upload box: read the file (in a thread: a PDF takes a while), then as `add_text`."""
    if not path:
        return
    try:
        stem, text = await asyncio.to_thread(byo.read_upload, path)
    except UserFacingError as exc:
        yield f"⚠️ {exc}", gr.update(), gr.update(), up
        return
    async for out in add_text(runtime, stem, text, up, names, target):
        yield out


async def add_pasted(runtime: Runtime, text: str, up: byo.Uploads, names: list[str] | None = None,
                     target: str | None = None):
    """The paste box's Add button: as `add_text`."""
    async for out in add_text(runtime, "pasted", text or "", up, names, target):
        yield out
