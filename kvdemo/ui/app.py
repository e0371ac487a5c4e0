"""The Gradio Blocks page of the blending demo: context on the left, 🚀 and 🐢 answering side by side.

`build_ui` lays out the page and wires callbacks; the logic of a turn lives in ui/session.py. Per-session
data is in a gr.State (ChatState); the Runtime (engines) is shared by nature.
"""

from __future__ import annotations

import asyncio
import random
import time
from contextlib import aclosing

import gradio as gr

from .. import uploads as byo
from ..client import RequestStats
from ..config import Settings, sharing_warning  # noqa: F401 - re-exported for callers
from ..errors import UserFacingError
from ..runtime import DEFAULT_CONTEXT_TOKENS, Runtime
from .api import register as register_api
from .chart import SERIES, X, Y, chart_caption, chart_frame, chart_title, colour_map, load_benchmark
from .session import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    MAX_TEMPERATURE,
    MAX_TOKENS,
    ChatState,
    EngineReply,
    Turn,
    answer_agreement,
    speedup,
    stream_turn,
    validate_turn,
)

PANES = ("lmcache", "plain")
PRIVATE = "private"  # api_visibility of the page's own events: the API (page and clients) lists /ask alone
STOP_WAIT_S = 10.0  # how long Stop waits for Gradio's cancel to end the running answers (it takes milliseconds)
WHY_LONG = ("Blending pays off on **long contexts**: it saves the prefill of reused chunks but costs a fixed "
            "~0.1 s to load and partly recompute them. Measured on one H100 (benchmarks/results/blend-h100.json): "
            "about even with plain vLLM at 4K tokens (sometimes slower), 1.70× faster at 8K, 3.03× at 16K and "
            "3.44× at 24K; with each engine on its own GPU 3.51× at 16K and 3.71× at 24K "
            "(benchmarks/results/blend-2gpu-h100.json).")
CSS = """
#speedup {font-size: 1.3em}
.sim-banner {background: #fff3cd; color: #664d03; padding: 6px 12px; border-radius: 6px; font-weight: 600}
"""


def launch_kwargs(s: Settings) -> dict:
    return {"server_name": s.server_name, "server_port": s.port, "share": s.share, "auth": s.auth,
            "show_error": False, "quiet": True, "css": CSS, "theme": gr.themes.Soft(), "footer_links": []}


def _sim(runtime: Runtime) -> str:
    return " (SIMULATED)" if runtime.settings.simulate else ""


def reuse_text(stats: RequestStats, lmcache: bool) -> str:
    """How many of the answer's prompt tokens its engine reused, as the engine reported them.

    vLLM's usage.prompt_tokens_details.cached_tokens (--enable-prompt-tokens-details): for 🐢 its prefix-cache
    hits; for 🚀 (prefix caching off) the tokens LMCache loaded. None: the engine did not say.
    """
    if stats.cached_tokens is None:
        return f"{stats.prompt_tokens:,} prompt tokens (reuse not reported)"
    source = "LMCache" if lmcache else "vLLM's prefix cache"
    return f"**{stats.cached_tokens:,}** of {stats.prompt_tokens:,} prompt tokens reused from {source}"


def stats_markdown(stats: RequestStats | None, runtime: Runtime, lmcache: bool = False) -> str:
    if stats is None:
        return ""
    tok_s = f"{stats.decode_tok_s:.0f} tok/s" if stats.decode_tok_s else "n/a"
    return (f"TTFT **{stats.ttft_s:.3f} s** · decode {tok_s} · {reuse_text(stats, lmcache)}"
            f"{_sim(runtime)}")


def stopped_text(tokens: int) -> str:
    if tokens == 0:
        return "⏹ stopped before the first token"
    return f"⏹ stopped after {tokens} token{'s' if tokens != 1 else ''}"


def pane_stats_markdown(state: ChatState, key: str, runtime: Runtime) -> str:
    """A pane's stats line: the last answer's timings, or how far it got if Stop cut it."""
    if key in state.stopped:
        return f"**{stopped_text(state.stopped[key])}**{_sim(runtime)}"
    lmcache = any(h.spec.lmcache for h in runtime.engines if h.spec.key == key)
    return stats_markdown(state.last_stats.get(key), runtime, lmcache)


def speedup_markdown(state: ChatState, runtime: Runtime) -> str:
    x = speedup(state.last_stats)
    if x is None:
        return ""
    verdict = "faster" if x >= 1 else "slower (short context: blending has a fixed cost)"
    return f"🚀 **{x:.1f}×** {verdict} to first token than 🐢{_sim(runtime)}"


def agreement_markdown(state: ChatState, runtime: Runtime) -> str:
    """How far 🚀's and 🐢's answers of the last turn agree; only when both answered, greedily."""
    texts = [state.answers.get(k, "") for k in PANES]
    if not all(t.strip() for t in texts):
        return ""  # an engine did not answer, failed, or answered nothing
    if state.temperature != 0:
        return "Agreement of 🚀 and 🐢 is shown at temperature 0 only."
    assert runtime.builder is not None
    k, m = answer_agreement(runtime.builder.tokenizer, *texts)
    how = (f"give the same answer ({m} tokens)" if k == m else
           f"agree on the first **{k}** of {m} answer tokens")
    return (f"🚀 and 🐢 {how} (greedy decoding; blending recomputes only part of the context, so answers may "
            f"drift — see the quality benchmark in README){_sim(runtime)}")


def mode_markdown(runtime: Runtime) -> str:
    if runtime.sequential:
        why = " — both engines share one GPU, and concurrent prefills would skew TTFT" if runtime.shared_gpu else ""
        return f"Answer mode: **sequential** (🚀 first, then 🐢){why}."
    return "Answer mode: **concurrent** (engines on separate GPUs answer at once)."


def _reply_message(reply: EngineReply, runtime: Runtime) -> str:
    if reply.stopped:
        return reply.text + ("\n\n" if reply.text else "") + f"`{stopped_text(reply.tokens)}`"
    if reply.error:
        text = reply.text + ("\n\n" if reply.text else "")
        first, _, rest = reply.error.partition("\n")
        return text + f"⚠️ {first}" + (f"\n```\n{rest.strip()}\n```" if rest.strip() else "")
    if reply.stats:
        return reply.text + f"\n\n`TTFT {reply.stats.ttft_s:.3f} s`{_sim(runtime)}"
    return reply.text or "…"


def build_ui(runtime: Runtime) -> gr.Blocks:
    builder = runtime.builder
    assert builder is not None
    library = runtime.library
    titles = library.titles()
    choices = [(f"{titles[n]}  ({len(builder.chunk_ids(n)):,} tok)", n) for n in library.chunks]
    default_chunks = builder.default_selection(DEFAULT_CONTEXT_TOKENS, runtime.max_model_len - 512)
    handles = {h.spec.key: h for h in runtime.engines}
    labels = [h.spec.label for h in runtime.engines]
    simulated = bool(runtime.settings.simulate)
    bench = load_benchmark()  # the reference curve, the same for every session; None if the file is missing

    def chart(state: ChatState):
        return chart_frame(state, bench, simulated)

    def all_choices(up: byo.Uploads) -> list[tuple[str, str]]:
        """The library's chunks, then this session's uploaded ones."""
        return choices + [(f"{c.name}  ({len(c.ids):,} tok)", c.name) for c in up.chunks.values()]

    def context_info(names: list[str] | None, sys_prompt: str, up: byo.Uploads | None = None) -> tuple[str, str]:
        names = list(names or [])
        up = up or byo.Uploads()
        names = [x for x in names if x in library.chunks or x in up.chunks]
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

    def prepare(question, names, sys_prompt, temperature, max_tokens, engines, state: ChatState,
                up: byo.Uploads | None = None):
        if state.streaming or state.pending is not None:  # a new turn would write into this one's messages
            busy = "⚠️ Still answering the previous question: ask again when it is done (or Clear chat)."
            return state, busy, *_chats(state), gr.update()
        try:
            evicted = byo.check_evicted(runtime, up, names)  # uploads evicted by the engine-wide upload budget
            turn = validate_turn(runtime, question, names, sys_prompt, temperature, max_tokens, engines,
                                 up.ids() if up else None)
        except UserFacingError as exc:
            return state, f"⚠️ {exc}", *_chats(state), gr.update()
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
        state.answers.clear()
        state.stopped.clear()
        state.temperature = turn.temperature
        state.turn += 1
        state.pending = turn
        return state, " ".join(notes), *_chats(state), ""

    def _chats(state: ChatState) -> list[list[dict]]:
        return [list(state.histories.get(k, [])) for k in PANES]

    def record(state: ChatState, turn: Turn, replies: dict[str, EngineReply], stopped: bool = False) -> None:
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
            history[-1] = {"role": "assistant", "content": _reply_message(reply, runtime)}
            if reply.stats and not reply.error:
                state.last_stats[key] = reply.stats
                if not reply.stopped:
                    state.add_point(key, reply.stats)
            if reply.stopped:
                state.stopped[key] = reply.tokens
            elif reply.done and not reply.error:
                state.answers[key] = reply.text

    def outputs(state: ChatState) -> tuple:
        # The chart's frame goes with every step: Gradio streams diffs, so an unchanged chart costs nothing.
        return (*_chats(state), *[pane_stats_markdown(state, k, runtime) for k in PANES],
                speedup_markdown(state, runtime), agreement_markdown(state, runtime), chart(state))

    async def stream(sys_prompt: str, state: ChatState):
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
                    record(state, turn, replies)
                    yield (*outputs(state), state)
            finished = True
        finally:
            # Stop cancels this event: Gradio cancels the task iterating this generator (CancelledError at its
            # current await) or closes it at its `yield` (GeneratorExit); either way `aclosing` has closed
            # stream_turn, which closed both engine streams. Keep the partial answers, marked stopped; the
            # Stop button's own event shows them (a cancelled generator yields nothing more).
            if not finished:
                record(state, turn, replies, stopped=True)
            state.streaming = False

    async def stop(state: ChatState):
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
            record(state, turn, {}, stopped=True)
        return outputs(state)

    def restart(key: str) -> str:
        """Blocking (runs in Gradio's worker thread): the engine is back, or the message says why not."""
        label = handles[key].spec.label
        try:
            seconds = runtime.restart_engine(key)
        except UserFacingError as exc:
            return f"⚠️ Restart of {label} failed: {exc}"
        again = " and its chunks precomputed again" if handles[key].spec.lmcache else ""
        return f"{label} restarted in {seconds:.1f} s{again}."

    async def add_text(stem: str, text: str, up: byo.Uploads, names: list[str] | None = None,
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
            options = all_choices(up)
            kept = byo.kept_selection(up, names, library.chunks)
            target = target if target in {n for _, n in options} else None
            yield (step.line, gr.update(choices=options, value=kept), gr.update(choices=options, value=target), up)

    async def add_file(path, up: byo.Uploads, names: list[str] | None = None, target: str | None = None):
        """The upload box: read the file (in a thread: a PDF takes a while), then as `add_text`."""
        if not path:
            return
        try:
            stem, text = await asyncio.to_thread(byo.read_upload, path)
        except UserFacingError as exc:
            yield f"⚠️ {exc}", gr.update(), gr.update(), up
            return
        async for out in add_text(stem, text, up, names, target):
            yield out

    async def add_pasted(text: str, up: byo.Uploads, names: list[str] | None = None, target: str | None = None):
        async for out in add_text("pasted", text or "", up, names, target):
            yield out

    def clear(state: ChatState):
        state.clear()
        return state, [], [], "", "", "", "", chart(state)

    with gr.Blocks(title="kvdemo: LMCache vs plain vLLM") as demo:
        state = gr.State(ChatState())  # deep-copied for each browser session
        uploads = gr.State(byo.Uploads())  # this session's own uploaded chunks
        gr.Markdown("# 🚀 vLLM + LMCache vs 🐢 plain vLLM\nPick text chunks in any order, ask a question, and "
                    "watch both engines answer. 🚀 reuses each chunk's KV cache (CacheBlend), in any order; "
                    "🐢 can only reuse an identical prefix.")
        if runtime.settings.simulate:
            gr.Markdown("SIMULATED: no GPU — engines are simulated and every timing is SIMULATED, "
                        "not a measurement.", elem_classes="sim-banner", elem_id="sim-banner")
        with gr.Row(equal_height=True):
            status = gr.Markdown(runtime.status_line(), elem_id="status")
            restarts = {key: gr.Button(f"Restart {h.spec.label.split()[0]}", elem_id=f"restart-{key}", size="sm",
                                       scale=0, min_width=120)
                        for key, h in handles.items() if h.process is not None}
        with gr.Row():
            with gr.Column(scale=2):
                sys_prompt = gr.Textbox(library.sys_prompt, label="System prompt (editable)", lines=3,
                                        elem_id="sys-prompt")
                chunks = gr.Dropdown(choices, value=default_chunks, multiselect=True, label="Chunks, in order",
                                     info="Selection order is prompt order.", elem_id="chunks")
                with gr.Row(equal_height=True):
                    move_target = gr.Dropdown(choices, value=None, label="Move chunk", elem_id="move-chunk",
                                              scale=3)
                    with gr.Column(scale=1, min_width=90):
                        up = gr.Button("⬆ Up", elem_id="btn-up", size="sm")
                        down = gr.Button("⬇ Down", elem_id="btn-down", size="sm")
                with gr.Row():
                    reverse = gr.Button("⇅ Reverse order", elem_id="btn-reverse", size="sm")
                    shuffle = gr.Button("🔀 Shuffle", elem_id="btn-shuffle", size="sm")
                with gr.Accordion("Bring your own text", open=False, elem_id="byo"):
                    gr.Markdown(f"Upload a .txt, .md or .pdf file (a PDF's text layer; scans have none), or paste "
                                f"text: it is split at headings and paragraphs "
                                f"into chunks of up to **{byo.TARGET_TOKENS:,} tokens**, precomputed on 🚀 and "
                                f"added to the chunk picker as “upload: …”. Only you see them. Limits: "
                                f"{byo.MAX_FILE_BYTES // 2**20} MB a file, {byo.MAX_SESSION_TOKENS:,} tokens and "
                                f"{byo.MAX_SESSION_CHUNKS} chunks per session. All visitors' uploads share 🚀's "
                                f"KV cache with the shipped chunks: {runtime.upload_ledger.describe()}; the "
                                f"oldest are evicted first.", elem_id="byo-info")
                    upload_file = gr.File(label="Upload .txt / .md / .pdf", file_types=list(byo.EXTENSIONS),
                                          file_count="single", type="filepath", elem_id="byo-file", height=110)
                    pasted = gr.Textbox(label="…or paste text", lines=4, max_lines=8, elem_id="byo-text")
                    add_btn = gr.Button("Add", size="sm", elem_id="byo-add")
                    upload_status = gr.Markdown(elem_id="byo-status")
                info0, text0 = context_info(default_chunks, library.sys_prompt)
                info = gr.Markdown(info0, elem_id="context-info")
                with gr.Accordion("Assembled context (⟪ # # ⟫ = separator between cached chunks)", open=False):
                    context_view = gr.Textbox(text0, show_label=False, lines=14, max_lines=14, interactive=False,
                                              elem_id="context-view")
                gr.Markdown(WHY_LONG)
            with gr.Column(scale=3):
                with gr.Row():
                    chats, stats = [], []
                    for key in PANES:
                        with gr.Column():
                            label = handles[key].spec.label + _sim(runtime)
                            chats.append(gr.Chatbot(label=label, height=380, elem_id=f"chat-{key}",
                                                    feedback_options=None))
                            stats.append(gr.Markdown(elem_id=f"stats-{key}"))
                badge = gr.Markdown(elem_id="speedup")
                agreement = gr.Markdown(elem_id="agreement")
                notice = gr.Markdown(elem_id="notice")
                question = gr.Textbox(label="Question", placeholder="e.g. How does Python resolve names in a class "
                                      "body?", elem_id="question")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    stop_btn = gr.Button("⏹ Stop", variant="stop", elem_id="stop")
                    clear_btn = gr.Button("Clear chat", elem_id="clear")
                # x from 0 to the model's limit, y from 0: this session's points and the benchmark, to scale.
                plot = gr.ScatterPlot(chart(ChatState()), x=X, y=Y, color=SERIES, title=chart_title(simulated),
                                      x_title="context (prompt tokens)", y_title="TTFT (s)", color_title="",
                                      color_map=colour_map(bench, simulated), x_lim=[0, runtime.max_model_len],
                                      y_lim=[0, None], tooltip="all", height=340, elem_id="ttft-chart",
                                      buttons=[])
                gr.Markdown(chart_caption(bench), elem_id="ttft-chart-note")
                with gr.Accordion("Generation settings", open=False):
                    temperature = gr.Slider(0.0, MAX_TEMPERATURE, value=DEFAULT_TEMPERATURE, step=0.05,
                                            label="Temperature", elem_id="temperature")
                    max_tokens = gr.Slider(1, MAX_TOKENS, value=DEFAULT_MAX_TOKENS, step=1, label="Max tokens",
                                           elem_id="max-tokens")
                    engines = gr.CheckboxGroup(labels, value=labels, label="Engines that answer",
                                               elem_id="engines")
                gr.Markdown(mode_markdown(runtime), elem_id="mode")

        for trigger in (chunks.change, sys_prompt.change):
            trigger(context_info, [chunks, sys_prompt, uploads], [info, context_view], queue=False,
                    api_visibility=PRIVATE)
        byo_outputs = [upload_status, chunks, move_target, uploads]
        byo_inputs = [uploads, chunks, move_target]  # the pickers' values: an eviction takes chunks off them
        upload_file.upload(add_file, [upload_file, *byo_inputs], byo_outputs, api_visibility=PRIVATE).then(
            lambda: None, None, upload_file, queue=False, api_visibility=PRIVATE)  # ready for the next file
        add_btn.click(add_pasted, [pasted, *byo_inputs], byo_outputs, api_visibility=PRIVATE)
        up.click(lambda n, t: move(n, t, -1), [chunks, move_target], chunks, queue=False, api_visibility=PRIVATE)
        down.click(lambda n, t: move(n, t, +1), [chunks, move_target], chunks, queue=False, api_visibility=PRIVATE)
        reverse.click(lambda n: list(reversed(n or [])), chunks, chunks, queue=False, api_visibility=PRIVATE)
        shuffle.click(shuffled, chunks, chunks, queue=False, api_visibility=PRIVATE)
        inputs = [question, chunks, sys_prompt, temperature, max_tokens, engines, state, uploads]
        prepared_outputs = [state, notice, *chats, question]
        streamed_outputs = [*chats, *stats, badge, agreement, plot, state]
        streams = [trigger(prepare, inputs, prepared_outputs, queue=False, api_visibility=PRIVATE).then(
                       stream, [sys_prompt, state], streamed_outputs, api_visibility=PRIVATE)
                   for trigger in (ask.click, question.submit)]
        # Stop: Gradio's cancel (cancels=; the event it adds is private too) cancels this session's `stream`, then
        # `stop` shows the stopped answers. The page runs one click's events in the order they were added, each
        # after the one before has finished, so the cancel is added first: `stop` waits for it to land.
        stop_btn.click(None, None, None, cancels=streams, api_visibility=PRIVATE)
        stop_btn.click(stop, state, streamed_outputs[:-1], api_visibility=PRIVATE)
        clear_btn.click(clear, state, [state, *chats, *stats, badge, agreement, plot], queue=False,
                        api_visibility=PRIVATE)
        for key, button in restarts.items():
            button.click(lambda k=key: restart(k), None, notice, concurrency_limit=1,
                         concurrency_id="restart", api_visibility=PRIVATE)
        gr.Timer(2.0).tick(runtime.status_line, None, status, queue=False, api_visibility=PRIVATE)
        register_api(runtime)  # the one public endpoint, /ask (ui/api.py)
    return demo
