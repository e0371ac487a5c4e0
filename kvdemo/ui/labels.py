"""What the pages say: the SIMULATED label, and the blend page's stats lines, badge, agreement and answer text.

Plain functions of the Runtime and a session's ChatState (no Gradio), shared by both pages and the handlers.
"""

from __future__ import annotations

from ..client import RequestStats
from ..runtime import Runtime
from ..telemetry import LoadRecord
from .session import ChatState, EngineReply, answer_agreement, speedup

PANES = ("lmcache", "plain")  # the blend page's answer panes, in order
SIMULATED_BANNER = "SIMULATED: no GPU — engines are simulated and every timing is SIMULATED, not a measurement."


def simulated_label(runtime: Runtime) -> str:
    """`` (SIMULATED)`` after every number a simulated engine produced, else nothing."""
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


def stats_markdown(stats: RequestStats | None, runtime: Runtime, lmcache: bool = False,
                   load: LoadRecord | None = None) -> str:
    if stats is None:
        return ""
    tok_s = f"{stats.decode_tok_s:.0f} tok/s" if stats.decode_tok_s else "n/a"
    line = (f"TTFT **{stats.ttft_s:.3f} s** · decode {tok_s} · {reuse_text(stats, lmcache)}"
            f"{simulated_label(runtime)}")
    return line + (f"  \n{load_text(stats, runtime, load)}" if lmcache else "")


def load_text(stats: RequestStats, runtime: Runtime, load: LoadRecord | None) -> str:
    """What LMCache did for this answer, from the line its engine wrote for this request (kvdemo.telemetry)."""
    if load is not None:
        return "🔎 " + load.summary()
    if runtime.settings.attach:
        return "🔎 LMCache's per-request figures need engines kvdemo started (not --attach)"
    if not stats.cached_tokens:
        return ("🔎 LMCache loaded nothing for this answer (no stored chunk matched, or too few tokens to be worth "
                "loading: they were prefilled)")
    return "🔎 LMCache's record of this request did not arrive (see the engine log)"


def stopped_text(tokens: int) -> str:
    if tokens == 0:
        return "⏹ stopped before the first token"
    return f"⏹ stopped after {tokens} token{'s' if tokens != 1 else ''}"


def pane_stats_markdown(state: ChatState, key: str, runtime: Runtime) -> str:
    """A pane's stats line: the last answer's timings, or how far it got if Stop cut it."""
    if key in state.stopped:
        return f"**{stopped_text(state.stopped[key])}**{simulated_label(runtime)}"
    lmcache = any(h.spec.lmcache for h in runtime.engines if h.spec.key == key)
    return stats_markdown(state.last_stats.get(key), runtime, lmcache, state.last_loads.get(key))


def speedup_markdown(state: ChatState, runtime: Runtime) -> str:
    x = speedup(state.last_stats)
    if x is None:
        return ""
    verdict = "faster" if x >= 1 else "slower (short context: blending has a fixed cost)"
    return f"🚀 **{x:.1f}×** {verdict} to first token than 🐢{simulated_label(runtime)}"


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
            f"drift — see the quality benchmark in README){simulated_label(runtime)}")


def mode_markdown(runtime: Runtime) -> str:
    if runtime.sequential:
        why = " — both engines share one GPU, and concurrent prefills would skew TTFT" if runtime.shared_gpu else ""
        return f"Answer mode: **sequential** (🚀 first, then 🐢){why}."
    return "Answer mode: **concurrent** (engines on separate GPUs answer at once)."


def reply_message(reply: EngineReply, runtime: Runtime) -> str:
    """An answer as its chat pane shows it: the text, then how it ended (timing, stop, or error)."""
    if reply.stopped:
        return reply.text + ("\n\n" if reply.text else "") + f"`{stopped_text(reply.tokens)}`"
    if reply.error:
        text = reply.text + ("\n\n" if reply.text else "")
        first, _, rest = reply.error.partition("\n")
        return text + f"⚠️ {first}" + (f"\n```\n{rest.strip()}\n```" if rest.strip() else "")
    if reply.stats:
        return reply.text + f"\n\n`TTFT {reply.stats.ttft_s:.3f} s`{simulated_label(runtime)}"
    return reply.text or "…"
