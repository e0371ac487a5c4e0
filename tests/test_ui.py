"""The Gradio page's callbacks, called in-process (no browser) against the simulated engines.

What a browser can hardly time reliably lives here: a second question, or "Clear chat", while a turn streams.
"""

from __future__ import annotations

import asyncio
import re
import time

import pandas as pd
import pytest
from conftest import LABELS, make_runtime

from kvdemo.config import SCENARIO_NAMES, Settings
from kvdemo.ui.app import build_ui, sharing_warning
from kvdemo.ui.chart import drawn
from kvdemo.ui.handlers import clear, context_info, prepare, stop, stream
from kvdemo.ui.labels import agreement_markdown, mode_markdown
from kvdemo.ui.pages import PAGES
from kvdemo.ui.session import ChatState
from kvdemo.ui.share_app import build_share_ui


@pytest.fixture(scope="module")
def ui(builder, sim_engines):
    """A runtime on the simulated engines; its page wires the handlers these tests call directly."""
    runtime = make_runtime(builder, handles=sim_engines)
    events = {f.name for f in build_ui(runtime).fns.values()}
    assert {"prepare", "stream", "stop", "clear", "context_info"} <= events
    return runtime


def test_every_scenario_has_its_page():
    """The UI picks the page by scenario name (a scenario knows nothing of the UI)."""
    assert tuple(PAGES) == SCENARIO_NAMES
    assert PAGES["blend"] is build_ui and PAGES["share"] is build_share_ui


def ask(runtime, state: ChatState, question: str, max_tokens: int = 24, temperature: float = 0.0,
        engines: list[str] = LABELS):
    names = list(runtime.library.chunks)[:2]
    return prepare(runtime, question, names, runtime.library.sys_prompt, temperature, max_tokens, engines, state)


async def drain(agen) -> list[tuple]:
    return [out async for out in agen]


def messages(state: ChatState, key: str) -> list[str]:
    return [m["content"] for m in state.histories.get(key, [])]


def comparable(outs: tuple) -> tuple:
    """Outputs with the chart's DataFrame as records, so that two outputs compare with ==."""
    return tuple(o.to_json(orient="split") if isinstance(o, pd.DataFrame) else o for o in outs)


def session_rows(plot: pd.DataFrame) -> pd.DataFrame:
    """The chart's points of this session's answers (not its placeholders, nor the benchmark's)."""
    points = drawn(plot)
    return points[points["series"].str.contains("this session")]


def test_a_turn_streams_into_both_panes(ui):
    runtime = ui
    state = ChatState()
    _, notice, *_ = ask(runtime, state, "What is a decorator?")
    assert state.pending is not None and "Precompute" in notice  # this runtime never precomputed
    outs = asyncio.run(drain(stream(runtime, runtime.library.sys_prompt, state)))
    assert len(outs) > 2  # streamed in steps
    chat_lm, chat_plain, stats_lm, stats_plain, badge, agreement, _, _ = outs[-1]
    for chat, stats in ((chat_lm, stats_lm), (chat_plain, stats_plain)):
        assert chat[-2] == {"role": "user", "content": "What is a decorator?"}
        assert "[SIMULATED]" in chat[-1]["content"] and "TTFT" in chat[-1]["content"]
        assert stats.startswith("TTFT") and stats.endswith("(SIMULATED)")
    n_prompt = state.last_stats["plain"].prompt_tokens
    reuse_line, load_line = stats_lm.split("  \n")
    assert re.search(rf"\*\*[\d,]+\*\* of {n_prompt:,} prompt tokens reused from LMCache \(SIMULATED\)$", reuse_line)
    # What LMCache did for this very answer: the simulated engine's telemetry line for its request id.
    load = state.last_loads["lmcache"]
    assert load is not None and load.simulated and load.prompt_tokens == n_prompt
    assert load.loaded_tokens == state.last_stats["lmcache"].cached_tokens
    assert load_line == "🔎 " + load.summary() and "recomputed" in load_line and load_line.endswith("(SIMULATED)")
    assert state.last_loads.get("plain") is None
    assert re.search(rf"\*\*[\d,]+\*\* of {n_prompt:,} prompt tokens reused from vLLM's prefix cache \(SIMULATED\)$",
                     stats_plain)
    # The chart: this turn's two answers, each once it has finished.
    assert session_rows(outs[0][6]).empty
    rows = session_rows(outs[-1][6])
    assert sorted(rows["series"]) == ["🐢 this session (SIMULATED)", "🚀 this session (SIMULATED)"]
    assert set(rows["context_tokens"]) == {n_prompt}
    assert "to first token than 🐢 (SIMULATED)" in badge
    # Same prompt ids, greedy: the simulated engines give the same answer.
    n = len(runtime.builder.tokenizer.encode(state.answers["plain"], add_special_tokens=False))
    assert state.answers["lmcache"] == state.answers["plain"] and n > 0
    assert agreement.startswith(f"🚀 and 🐢 give the same answer ({n} tokens) (greedy decoding;")
    assert agreement.endswith("(SIMULATED)")
    assert all(out[5] == "" for out in outs[:-2])  # nothing while an answer is still streaming
    assert not state.streaming and state.pending is None


def test_the_chart_grows_with_each_turn(ui):
    """Two turns: two points per engine (TTFT vs prompt tokens) beside the committed H100 benchmark curve."""
    runtime = ui
    state = ChatState()
    plots, contexts = [], []
    for question in ("What is a decorator?", "And what is a metaclass?"):
        ask(runtime, state, question)
        outs = asyncio.run(drain(stream(runtime, runtime.library.sys_prompt, state)))
        plots.append(outs[-1][6])
        contexts.append(state.last_stats["lmcache"].prompt_tokens)
    for plot, turns in zip(plots, (1, 2)):
        points = drawn(plot)
        for emoji in ("🚀", "🐢"):
            mine = points[points["series"] == f"{emoji} this session (SIMULATED)"]
            assert len(mine) == turns and list(mine["context_tokens"]) == contexts[:turns]
            assert (mine["ttft_s"] > 0).all()
            assert len(points[points["series"] == f"{emoji} benchmark (H100)"]) >= 4  # the reference curve
    # What the page's ScatterPlot makes of it: every row, with its series as the colour.
    plot_data = next(b for b in ui_blocks(runtime) if getattr(b, "elem_id", None) == "ttft-chart").postprocess(
        plots[-1])
    assert plot_data.columns == ["context_tokens", "ttft_s", "series"] and len(plot_data.data) == len(plots[-1])
    cleared = clear(runtime, state)[-1]
    assert session_rows(cleared).empty and len(drawn(cleared)) == len(drawn(plots[-1])) - 4


def ui_blocks(runtime):
    return build_ui(runtime).blocks.values()


def test_agreement_only_for_two_greedy_answers(ui):
    runtime = ui
    state = ChatState()
    ask(runtime, state, "What is a generator?", temperature=0.7)
    agreement = asyncio.run(drain(stream(runtime, runtime.library.sys_prompt, state)))[-1][5]
    assert agreement == "Agreement of 🚀 and 🐢 is shown at temperature 0 only."
    ask(runtime, state, "What is a generator?", engines=LABELS[1:])  # 🐢 alone
    outs = asyncio.run(drain(stream(runtime, runtime.library.sys_prompt, state)))
    assert all(out[5] == "" for out in outs)
    assert clear(runtime, state)[6] == "" and state.answers == {} and state.temperature is None


def test_agreement_markdown_counts_and_skips_failed_answers(ui):
    runtime = ui
    state = ChatState(answers={"lmcache": "The cache is loaded from disk.", "plain": "The cache is rebuilt."},
                      temperature=0.0)
    assert agreement_markdown(state, runtime).startswith("🚀 and 🐢 agree on the first **3** of 8 answer tokens")
    state.answers["plain"] = "  "  # empty answer
    assert agreement_markdown(state, runtime) == ""
    del state.answers["plain"]  # failed answer (not recorded)
    assert agreement_markdown(state, runtime) == ""


def test_second_question_while_streaming_is_refused(ui):
    runtime = ui
    state = ChatState()
    ask(runtime, state, "First question?")

    async def go():
        agen = stream(runtime, runtime.library.sys_prompt, state)
        await agen.__anext__()  # the first turn is streaming now
        assert state.streaming
        _, notice, chat_lm, chat_plain, _ = ask(runtime, state, "Second question?")
        assert "Still answering the previous question" in notice
        assert len(chat_lm) == len(chat_plain) == 2  # no second turn was added
        await drain(agen)

    asyncio.run(go())
    for key in ("lmcache", "plain"):
        first_q, answer = messages(state, key)
        assert first_q == "First question?" and "TTFT" in answer
    assert not state.streaming
    # Once done, the next question is taken.
    _, notice, chat_lm, _, _ = ask(runtime, state, "Second question?")
    assert "Still answering" not in notice and chat_lm[-2]["content"] == "Second question?"
    asyncio.run(drain(stream(runtime, runtime.library.sys_prompt, state)))
    assert all("TTFT" in messages(state, k)[-1] for k in ("lmcache", "plain"))


def test_clear_chat_while_streaming(ui):
    runtime = ui
    state = ChatState()
    ask(runtime, state, "First question?")

    async def go():
        agen = stream(runtime, runtime.library.sys_prompt, state)
        await agen.__anext__()
        cleared = clear(runtime, state)
        assert cleared[1:7] == ([], [], "", "", "", "") and session_rows(cleared[7]).empty
        return await drain(agen)  # must not fail on the cleared histories

    outs = asyncio.run(go())
    assert all(out[0] == [] and out[1] == [] and out[2] == "" for out in outs)
    assert state.histories == {} and state.last_stats == {} and state.points == [] and not state.streaming
    ask(runtime, state, "After clearing?")
    asyncio.run(drain(stream(runtime, runtime.library.sys_prompt, state)))
    assert messages(state, "plain")[0] == "After clearing?" and "TTFT" in messages(state, "plain")[1]


STOPPED = re.compile(r"\*\*(⏹ stopped (?:after (\d+) tokens?|before the first token))\*\* \(SIMULATED\)")


def assert_stopped(outs, state: ChatState) -> None:
    """The Stop button's outputs: both panes' answers stopped (partial text kept), no badge, no agreement."""
    *chats, stats_lm, stats_plain, badge, agreement, plot = outs
    for key, chat, stats in zip(("lmcache", "plain"), chats, (stats_lm, stats_plain)):
        m = STOPPED.fullmatch(stats)
        assert m, stats
        last = chat[-1]["content"]
        assert last.endswith(f"`{m.group(1)}`") and "TTFT" not in last and "⚠️" not in last, last
        assert state.stopped[key] == int(m.group(2) or 0)
    assert badge == agreement == "" and state.answers == {}
    assert session_rows(plot).empty and state.points == []  # stopped answers are not plotted
    assert not state.streaming and state.pending is None


def test_stop_mid_answer_keeps_the_partial_answers(ui):
    """Stop, in-process: Gradio closes the cancelled `stream` generator (here at its yield, as its /cancel does
    when the event is between two steps), then the Stop button's own event, `stop`, shows the stopped answers."""
    runtime = ui
    state = ChatState()
    ask(runtime, state, "Stop me mid-answer?", max_tokens=2048)

    async def go():
        agen = stream(runtime, runtime.library.sys_prompt, state)
        async for out in agen:
            if any("[SIMULATED]" in chat[-1]["content"] for chat in out[:2]):
                break  # the first words are in: both answers are 24 to 64 tokens long
        await agen.aclose()
        return await stop(runtime, state)

    outs = asyncio.run(go())
    assert_stopped(outs, state)
    assert any("[SIMULATED]" in chat[-1]["content"] for chat in outs[:2])  # the partial answer stays
    assert comparable(asyncio.run(stop(runtime, state))) == comparable(outs)  # Stop again: nothing changes

    # The next question streams normally, and its panes show timings again.
    _, notice, *_ = ask(runtime, state, "And now the whole answer?")
    assert "Still answering" not in notice
    chat_lm, chat_plain, stats_lm, stats_plain, *_ = asyncio.run(drain(
        stream(runtime, runtime.library.sys_prompt, state)))[-1]
    assert all("TTFT" in chat[-1]["content"] for chat in (chat_lm, chat_plain))
    assert stats_lm.startswith("TTFT") and stats_plain.startswith("TTFT") and state.stopped == {}
    assert "⏹ stopped" in chat_lm[-3]["content"]  # the stopped answer stays in the history


def test_stop_waits_for_the_cancel_of_the_running_stream(ui):
    """The Stop button's `stop` may start before Gradio's cancel reaches the streaming task: it waits for it."""
    runtime = ui
    state = ChatState()
    ask(runtime, state, "Cancel this task?", max_tokens=2048)

    async def go():
        outs: list[tuple] = []

        async def consume():
            async for out in stream(runtime, runtime.library.sys_prompt, state):
                outs.append(out)

        task = asyncio.create_task(consume())
        deadline = time.monotonic() + 30
        while not outs:
            assert time.monotonic() < deadline and not task.done(), "no answer began streaming"
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(stop(runtime, state))
        await asyncio.sleep(0)  # `stop` runs up to its first wait
        assert not stopping.done() and state.streaming
        task.cancel()  # what Gradio's cancel does to the running `stream` event
        try:
            await task
        except asyncio.CancelledError:
            pass
        return await stopping

    assert_stopped(asyncio.run(go()), state)


def test_stop_of_a_turn_not_yet_streaming_and_with_nothing_to_stop(ui):
    runtime = ui
    state = ChatState()
    nothing = asyncio.run(stop(runtime, state))  # nothing asked yet: nothing changes
    assert nothing[:6] == ([], [], "", "", "", "") and session_rows(nothing[6]).empty

    ask(runtime, state, "Stopped before it began?")  # prepared; its `stream` event has not started
    outs = asyncio.run(stop(runtime, state))
    assert_stopped(outs, state)
    assert all(chat[-1]["content"] == "`⏹ stopped before the first token`" for chat in outs[:2])
    assert asyncio.run(drain(stream(runtime, runtime.library.sys_prompt, state))) == []  # nothing left to stream

    ask(runtime, state, "And this one?")
    last = asyncio.run(drain(stream(runtime, runtime.library.sys_prompt, state)))[-1]
    again = asyncio.run(stop(runtime, state))  # after a finished turn, Stop changes nothing
    assert again[:-1] == last[:-2] and len(session_rows(again[-1])) == 2
    assert all("TTFT" in chat[-1]["content"] for chat in last[:2])


def test_invalid_question_adds_no_turn(ui):
    runtime = ui
    state = ChatState()
    _, notice, chat_lm, chat_plain, _ = ask(runtime, state, "   ")
    assert notice == "⚠️ Type a question first." and chat_lm == chat_plain == [] and state.pending is None
    assert asyncio.run(drain(stream(runtime, runtime.library.sys_prompt, state))) == []


def test_context_info(ui, builder):
    runtime = ui
    names = list(runtime.library.chunks)[:3][::-1]
    info, text = context_info(runtime, names, runtime.library.sys_prompt)
    titles = runtime.library.titles()
    assert f"**Context: {builder.context_tokens(names):,} tokens**, 3 chunks" in info
    assert "Order: " + " → ".join(titles[n] for n in names) in info
    assert text == builder.display_text(names)
    over, _ = context_info(runtime, list(runtime.library.chunks), runtime.library.sys_prompt)
    assert "over the limit of 32,768" in over
    empty, _ = context_info(runtime, [], runtime.library.sys_prompt)
    assert "(no chunks: question only)" in empty


def test_sharing_warning():
    assert sharing_warning(Settings()) is None
    assert "--share" in sharing_warning(Settings(share=True))
    assert "0.0.0.0" in sharing_warning(Settings(server_name="0.0.0.0"))
    assert sharing_warning(Settings(share=True, auth=("u", "p"))) is None


def test_answer_mode_text(builder):
    assert "concurrent" in mode_markdown(make_runtime(builder))
    assert "sequential" in mode_markdown(make_runtime(builder, "--fairness", "sequential"))
