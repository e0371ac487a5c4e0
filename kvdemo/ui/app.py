"""The Gradio Blocks page of the blending demo: context on the left, 🚀 and 🐢 answering side by side.

`build_ui` lays out the page and wires its events to the handlers (ui/handlers.py, plain functions of the
Runtime); the logic of a turn lives in ui/session.py, what the page says in ui/labels.py. Per-session
data is in a gr.State (ChatState); the Runtime (engines) is shared by nature.
"""

from __future__ import annotations

import gradio as gr

from .. import uploads as byo
from ..config import Settings, sharing_warning  # noqa: F401 - re-exported for callers
from ..runtime import Runtime
from .api import register as register_api
from .chart import SERIES, X, Y, chart_caption, chart_title, colour_map
from .handlers import (
    add_file,
    add_pasted,
    bind,
    chart,
    chunk_choices,
    clear,
    context_info,
    move,
    prepare,
    reference_benchmark,
    restart,
    shuffled,
    stop,
    stream,
)
from .labels import PANES, SIMULATED_BANNER, mode_markdown, simulated_label
from .session import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, MAX_TEMPERATURE, MAX_TOKENS, ChatState

PRIVATE = "private"  # api_visibility of the page's own events: the API (page and clients) lists /ask alone
WHY_LONG = ("Blending pays off on **long contexts**: it saves the prefill of reused chunks but costs a fixed "
            "~0.1 s to load and partly recompute them. Measured on one H100 with a Mistral-7B shape "
            "(benchmarks/results/blend-h100.json): 2.6× faster than plain vLLM at 16K tokens (0.182 vs 0.478 s) "
            "and 3.1× at 24K (0.250 vs 0.787 s); at 8K 1.5× and at 4K slower than plain vLLM. On a real "
            "1.5B model (Qwen2.5-Coder) it breaks even at 16K and is 2.0× faster at 31K.")
CSS = """
#speedup {font-size: 1.3em}
.sim-banner {background: #fff3cd; color: #664d03; padding: 6px 12px; border-radius: 6px; font-weight: 600}
"""


def launch_kwargs(s: Settings) -> dict:
    return {"server_name": s.server_name, "server_port": s.port, "share": s.share, "auth": s.auth,
            "show_error": False, "quiet": True, "css": CSS, "theme": gr.themes.Soft(), "footer_links": []}


def build_ui(runtime: Runtime) -> gr.Blocks:
    """Lay out the page and wire its events to the handlers (ui/handlers.py), each bound to `runtime`."""
    builder = runtime.builder
    assert builder is not None
    library = runtime.library
    choices = chunk_choices(runtime)
    default_chunks = builder.page_selection(runtime.max_model_len)
    handles = {h.spec.key: h for h in runtime.engines}
    labels = [h.spec.label for h in runtime.engines]
    simulated = bool(runtime.settings.simulate)
    bench = reference_benchmark()  # the reference curve, the same for every session; None if the file is missing

    with gr.Blocks(title="kvdemo: LMCache vs plain vLLM") as demo:
        state = gr.State(ChatState())  # deep-copied for each browser session
        uploads = gr.State(byo.Uploads())  # this session's own uploaded chunks
        gr.Markdown("# 🚀 vLLM + LMCache vs 🐢 plain vLLM\nPick text chunks in any order, ask a question, and "
                    "watch both engines answer. 🚀 reuses each chunk's KV cache (CacheBlend), in any order; "
                    "🐢 can only reuse an identical prefix.")
        if runtime.settings.simulate:
            gr.Markdown(SIMULATED_BANNER, elem_classes="sim-banner", elem_id="sim-banner")
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
                info0, text0 = context_info(runtime, default_chunks, library.sys_prompt)
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
                            label = handles[key].spec.label + simulated_label(runtime)
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
                plot = gr.ScatterPlot(chart(runtime, ChatState()), x=X, y=Y, color=SERIES, title=chart_title(simulated),
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
            trigger(bind(context_info, runtime), [chunks, sys_prompt, uploads], [info, context_view], queue=False,
                    api_visibility=PRIVATE)
        byo_outputs = [upload_status, chunks, move_target, uploads]
        byo_inputs = [uploads, chunks, move_target]  # the pickers' values: an eviction takes chunks off them
        upload_file.upload(bind(add_file, runtime), [upload_file, *byo_inputs], byo_outputs,
                           api_visibility=PRIVATE).then(
            lambda: None, None, upload_file, queue=False, api_visibility=PRIVATE)  # ready for the next file
        add_btn.click(bind(add_pasted, runtime), [pasted, *byo_inputs], byo_outputs, api_visibility=PRIVATE)
        up.click(lambda n, t: move(n, t, -1), [chunks, move_target], chunks, queue=False, api_visibility=PRIVATE)
        down.click(lambda n, t: move(n, t, +1), [chunks, move_target], chunks, queue=False, api_visibility=PRIVATE)
        reverse.click(lambda n: list(reversed(n or [])), chunks, chunks, queue=False, api_visibility=PRIVATE)
        shuffle.click(shuffled, chunks, chunks, queue=False, api_visibility=PRIVATE)
        inputs = [question, chunks, sys_prompt, temperature, max_tokens, engines, state, uploads]
        prepared_outputs = [state, notice, *chats, question]
        streamed_outputs = [*chats, *stats, badge, agreement, plot, state]
        streams = [trigger(bind(prepare, runtime), inputs, prepared_outputs, queue=False, api_visibility=PRIVATE)
                   .then(bind(stream, runtime), [sys_prompt, state], streamed_outputs, api_visibility=PRIVATE)
                   for trigger in (ask.click, question.submit)]
        # Stop: Gradio's cancel (cancels=; the event it adds is private too) cancels this session's `stream`, then
        # `stop` shows the stopped answers. The page runs one click's events in the order they were added, each
        # after the one before has finished, so the cancel is added first: `stop` waits for it to land.
        stop_btn.click(None, None, None, cancels=streams, api_visibility=PRIVATE)
        stop_btn.click(bind(stop, runtime), state, streamed_outputs[:-1], api_visibility=PRIVATE)
        clear_btn.click(bind(clear, runtime), state, [state, *chats, *stats, badge, agreement, plot], queue=False,
                        api_visibility=PRIVATE)
        for key, button in restarts.items():
            button.click(lambda k=key: restart(runtime, k), None, notice, concurrency_limit=1,
                         concurrency_id="restart", api_visibility=PRIVATE)
        gr.Timer(2.0).tick(runtime.status_line, None, status, queue=False, api_visibility=PRIVATE)
        register_api(runtime)  # the one public endpoint, /ask (ui/api.py)
    return demo
