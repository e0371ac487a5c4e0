"""The Gradio page of the KV-sharing scenario: send one long document + question to an engine of your
choice, and watch the TTFT table grow — LMCache (B) after LMCache (A) loads what A stored.

Per-session data (the rows of the results table) lives in a gr.State; the KV store is shared by nature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from ..errors import UserFacingError
from ..kvstore import KvStore
from ..runtime import Runtime
from ..telemetry import LoadRecord
from .labels import SIMULATED_BANNER, load_text, simulated_label
from .session import Turn, stream_turn, validate_turn

HOW_TO = ("**How to read it:** send the document to 🚀 LMCache **(A)** first — it computes the KV cache and stores "
          "it in the shared store — then to 🚀 LMCache **(B)**: B loads what A stored instead of computing it. "
          "The 🐢 plain engines cannot share: each computes everything itself (plain B after plain A stays slow).")
TABLE_HEADERS = ["#", "engine", "context tokens", "TTFT (s)", "tokens reused", "LMCache load"]
# Measured with real engines (benchmarks/results/share-h200.json, share-resp-h200.json, share-redis-h100.json):
# worth saying before anyone waits for it, or reads a warm load as a disk's speed.
REDIS_NOTE = ("Measured at 16K tokens with lmcache 0.5.3: B after A took 2.1 s through resp:// (~1 GB/s, one H200) "
              "and 6.8 s through redis:// (0.26 GB/s, one H100) where recomputing took ~0.5 s. Sharing works, but on "
              "one machine the directory store is the fast one.")
DISK_NOTE = ("Measured at 16K tokens on one H200: B after A took 0.15 s while A's files were in the page cache and "
             "1.14 s once they were dropped from it (the disk read ~2 GB/s), where recomputing took 0.48 s: a store "
             "on a disk pays while its files stay cached (or use tmpfs).")


def store_line(store: KvStore) -> str:
    """The store the page shows, where its bytes are, and what was measured for that kind of store."""
    line = f"Shared KV store: `{store.remote_url}`  \nWhere the KV lives: {store.location()}"
    note = REDIS_NOTE if store.redis_url else DISK_NOTE if store.on_disk() else None
    return f"{line}  \n{note}" if note else line


@dataclass
class ShareSession:
    """One browser session's measurements, in the order they were made."""

    rows: list[list] = field(default_factory=list)


def load_cell(load: LoadRecord | None) -> str:
    """The table's LMCache column: KV bytes loaded and how long the load took (GPU time when measured)."""
    if load is None or not load.kv_bytes_loaded:
        return ""
    ms = load.load_gpu_ms if load.load_gpu_ms is not None else load.load_host_ms
    return f"{load.kv_bytes_loaded / 1e9:.2f} GB" + (f" in {ms:.0f} ms" if ms is not None else "")


def build_share_ui(runtime: Runtime) -> gr.Blocks:
    builder = runtime.builder
    assert builder is not None
    titles = runtime.library.titles()
    choices = [(f"{titles[n]}  ({len(builder.chunk_ids(n)):,} tok)", n) for n in runtime.library.chunks]
    default_doc = builder.page_selection(runtime.max_model_len)
    labels = [h.spec.label for h in runtime.engines]
    sim = simulated_label(runtime)

    def context_info(names: list[str] | None) -> str:
        n = builder.context_tokens(list(names or []))
        return f"**Document: {n:,} tokens**, {len(names or [])} sections{sim}"

    def table(session: ShareSession) -> dict:
        return gr.update(value=session.rows, headers=TABLE_HEADERS)

    def plot_rows(session: ShareSession):
        """TTFT bars in query order, one colour per engine (matplotlib: renders the same on every browser)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.2))
        colors = dict(zip(labels, ("tab:blue", "tab:cyan", "tab:red", "tab:orange")))
        for r in session.rows:
            ax.bar(f"#{r[0]}", r[3], color=colors.get(r[1], "tab:gray"), label=r[1])
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles))
        if unique:
            ax.legend(unique.values(), [n.split(" ", 1)[1] for n in unique], fontsize=8)
        ax.set_ylabel("TTFT (s)")
        ax.set_title(f"TTFT per query{sim}", fontsize=10)
        fig.tight_layout()
        plt.close(fig)
        return fig

    async def send(engine_label: str, names, question: str, session: ShareSession):
        try:
            turn: Turn = validate_turn(runtime, question, names, runtime.library.sys_prompt, 0.0, 32,
                                       [engine_label])
        except UserFacingError as exc:
            yield f"⚠️ {exc}", "", table(session), plot_rows(session), session
            return
        reply = None
        async for replies in stream_turn(runtime, turn):
            reply = next(iter(replies.values()))
            yield "", reply.text, gr.update(), gr.update(), session  # table and plot change once, at the end
        if reply is None or reply.error or reply.stats is None:
            error = reply.error if reply and reply.error else "no answer"
            yield f"⚠️ {error.splitlines()[0]}", reply.text if reply else "", table(session), plot_rows(session), \
                session
            return
        stats = reply.stats
        reused = stats.cached_tokens if stats.cached_tokens is not None else "n/a"
        lmcache = any(h.spec.lmcache for h in runtime.engines if h.spec.label == engine_label)
        session.rows.append([len(session.rows) + 1, engine_label, stats.prompt_tokens, round(stats.ttft_s, 3), reused,
                             load_cell(reply.load)])
        note = f"{engine_label}: TTFT **{stats.ttft_s:.3f} s**{sim}"
        if lmcache:  # what this engine loaded from its CPU cache or the shared store, for this request
            note += "  \n" + load_text(stats, runtime, reply.load)
        yield note, reply.text, table(session), plot_rows(session), session

    def clear_store() -> str:
        try:
            freed = runtime.kv_store.clear()
        except UserFacingError as exc:
            return f"⚠️ {exc}"
        return (f"Cleared {freed / 2**20:,.0f} MiB from the shared KV store. LMCache engines still hold what "
                "is in their CPU memory: B only misses on documents A has not stored yet.")

    with gr.Blocks(title="kvdemo: KV sharing between engines") as demo:
        session = gr.State(ShareSession())  # deep-copied for each browser session
        gr.Markdown("# KV sharing: a second LMCache engine reuses the KV cache the first one stored\n" + HOW_TO)
        if runtime.settings.simulate:
            gr.Markdown(SIMULATED_BANNER, elem_classes="sim-banner", elem_id="sim-banner")
        status = gr.Markdown(runtime.status_line(), elem_id="status")
        gr.Markdown(store_line(runtime.kv_store),
                    elem_id="store")
        with gr.Row():
            with gr.Column(scale=2):
                engine = gr.Radio(labels, value=labels[0], label="Send to", elem_id="engine")
                doc = gr.Dropdown(choices, value=default_doc, multiselect=True, label="Document (sections, in order)",
                                  elem_id="doc")
                info = gr.Markdown(context_info(default_doc), elem_id="doc-info")
                question = gr.Textbox(label="Question", value="Which section explains how names are bound?",
                                      elem_id="question")
                with gr.Row():
                    send_btn = gr.Button("Send", variant="primary", elem_id="send")
                    clear_btn = gr.Button("Clear KV store", elem_id="clear-store")
                notice = gr.Markdown(elem_id="notice")
                with gr.Accordion("Answer", open=False):
                    answer = gr.Markdown(elem_id="answer")
            with gr.Column(scale=3):
                results = gr.Dataframe(headers=TABLE_HEADERS, label=f"TTFT per query{sim}", interactive=False,
                                       elem_id="results")
                plot = gr.Plot(label=f"TTFT per query{sim}", elem_id="plot")
        # The page's own events are not an API (as on the blend page): Gradio's API lists none of them.
        doc.change(context_info, doc, info, queue=False, api_visibility="private")
        send_btn.click(send, [engine, doc, question, session], [notice, answer, results, plot, session],
                       concurrency_limit=1, concurrency_id="send", api_visibility="private")
        clear_btn.click(clear_store, None, notice, queue=False, api_visibility="private")
        gr.Timer(2.0).tick(runtime.status_line, None, status, queue=False, api_visibility="private")
    return demo
