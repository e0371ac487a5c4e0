"""One browser session's turn without Gradio: validation messages, and streaming to the engines."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time

import pytest
from conftest import LABELS, SIM_MAX_MODEL_LEN, SIM_MODEL, make_runtime
from helpers import free_port, wait_until

from kvdemo.client import RequestStats
from kvdemo.engines import EngineProcess
from kvdemo.errors import UserFacingError
from kvdemo.runtime import EngineHandle, Runtime
from kvdemo.simulate import _answer_words, _hash
from kvdemo.ui.session import (
    MAX_TEMPERATURE,
    EngineReply,
    answer_agreement,
    speedup,
    stream_turn,
    validate_turn,
)

QUESTION = "What does the nonlocal statement do?"


@pytest.fixture
def runtime(builder) -> Runtime:
    return make_runtime(builder)


def turn(runtime, question=QUESTION, names=None, sys_prompt=None, temperature=0.0, max_tokens=64, engines=None):
    names = list(runtime.library.chunks)[:2] if names is None else names
    return validate_turn(runtime, question, names, sys_prompt or runtime.library.sys_prompt, temperature,
                         max_tokens, LABELS if engines is None else engines)


# ----- validation --------------------------------------------------------------------------------

def test_valid_turn(runtime, builder):
    names = list(runtime.library.chunks)[3:6]
    t = turn(runtime, question="  What is a closure?  ", names=names, engines=[LABELS[1]])
    assert t.question == "What is a closure?"
    assert t.prompt_ids == builder.build(names, "What is a closure?", runtime.library.sys_prompt)
    assert t.engine_keys == ["plain"] and t.chunk_names == names and t.note == ""


@pytest.mark.parametrize("question", ["", "   ", "\n\t", None])
def test_empty_question(runtime, question):
    with pytest.raises(UserFacingError, match="Type a question first"):
        turn(runtime, question=question)


@pytest.mark.parametrize("engines", [[], None, ["🦄 not an engine"]])
def test_no_engine_ticked(runtime, engines):
    with pytest.raises(UserFacingError, match="Tick at least one engine"):
        validate_turn(runtime, QUESTION, [], runtime.library.sys_prompt, 0.0, 64, engines)


@pytest.mark.parametrize("temperature", [-0.1, MAX_TEMPERATURE + 0.01, None])
def test_temperature_out_of_range(runtime, temperature):
    with pytest.raises(UserFacingError, match=f"Temperature must be between 0 and {MAX_TEMPERATURE}"):
        turn(runtime, temperature=temperature)


def test_temperature_bounds_are_allowed(runtime):
    assert turn(runtime, temperature=0).temperature == 0.0
    assert turn(runtime, temperature=MAX_TEMPERATURE).temperature == MAX_TEMPERATURE


@pytest.mark.parametrize("max_tokens", [0, None])
def test_max_tokens_at_least_one(runtime, max_tokens):
    with pytest.raises(UserFacingError, match="Max tokens must be at least 1"):
        turn(runtime, max_tokens=max_tokens)


def test_context_over_the_limit(builder):
    runtime = make_runtime(builder, "--max-model-len", "4096")
    names = list(runtime.library.chunks)[:2]  # ~5K tokens
    n = len(builder.build(names, QUESTION))
    with pytest.raises(UserFacingError) as exc:
        turn(runtime, names=names, max_tokens=100)
    msg = str(exc.value)
    assert f"Context is {n:,} tokens + 100 to generate" in msg and "limit of 4,096" in msg
    assert "deselect chunks or lower max tokens" in msg


def test_every_chunk_is_over_the_default_limit(runtime):
    with pytest.raises(UserFacingError, match="over the model's limit of 32,768"):
        turn(runtime, names=list(runtime.library.chunks))


def test_unknown_chunk(runtime):
    with pytest.raises(UserFacingError, match="Unknown chunk 'gone': reload the page"):
        turn(runtime, names=["gone"])


def test_no_chunks_is_allowed_with_a_note(runtime):
    t = turn(runtime, names=[])
    assert "No chunks selected" in t.note


def test_speedup():
    def stats(ttft: float) -> RequestStats:
        return RequestStats(ttft_s=ttft, total_s=ttft + 1, completion_tokens=10, prompt_tokens=100)

    assert speedup({"lmcache": stats(0.1), "plain": stats(0.25)}) == pytest.approx(2.5)
    assert speedup({"lmcache": stats(0.1)}) is None
    assert speedup({"lmcache": stats(0.0), "plain": stats(0.25)}) is None


class WordTokenizer:
    """One id per whitespace-separated word: agreement counts that can be read off the test."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return [hash(w) for w in text.split()]


def test_answer_agreement_counts_identical_leading_tokens():
    tok = WordTokenizer()
    assert answer_agreement(tok, "a b c d", "a b c d") == (4, 4)
    assert answer_agreement(tok, "a b c d e", "a b x d") == (2, 5)  # M is the longer answer's count
    assert answer_agreement(tok, "a b", "a b c") == (2, 3)  # one answer is a prefix of the other
    assert answer_agreement(tok, "x b c", "a b c") == (0, 3)
    assert answer_agreement(tok, "", "a b c") == (0, 3) and answer_agreement(tok, "a b", "") == (0, 2)
    assert answer_agreement(tok, "", "") == (0, 0)


def test_answer_agreement_with_the_model_tokenizer(tokenizer):
    def n(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    same = "[SIMULATED] The cache is loaded from disk."
    assert answer_agreement(tokenizer, same, same) == (n(same), n(same))
    a, b = "The cache is loaded from disk.", "The cache is rebuilt from disk."
    assert answer_agreement(tokenizer, a, b) == (n("The cache is"), max(n(a), n(b)))
    assert answer_agreement(tokenizer, "", a) == (0, n(a))


# ----- streaming a turn to the simulated engines ---------------------------------------------------

def collect(runtime: Runtime, t) -> list[dict[str, EngineReply]]:
    """Every yield of stream_turn, as copies (the generator updates the same reply objects)."""
    async def go():
        return [{k: dataclasses.replace(r) for k, r in replies.items()} async for replies in stream_turn(runtime, t)]

    return asyncio.run(go())


def test_stream_turn_concurrent(builder, sim_engines):
    runtime = make_runtime(builder, handles=sim_engines)
    assert not runtime.sequential
    snapshots = collect(runtime, turn(runtime, max_tokens=32))
    final = snapshots[-1]
    assert set(final) == {"lmcache", "plain"}
    for reply in final.values():
        assert reply.done and reply.error is None and reply.text.startswith("[SIMULATED]")
        assert reply.stats is not None and reply.stats.ttft_s > 0
    partial = [s for s in snapshots if any(r.text and not r.done for r in s.values())]
    assert partial, "no reply was seen while it was still streaming"


def test_stream_turn_sequential_answers_one_engine_after_the_other(builder, sim_engines):
    runtime = make_runtime(builder, "--fairness", "sequential", handles=sim_engines)
    assert runtime.sequential
    snapshots = collect(runtime, turn(runtime, max_tokens=16))
    first_plain = next(s for s in snapshots if s["plain"].text)
    assert first_plain["lmcache"].done and first_plain["lmcache"].stats is not None
    assert all(r.stats for r in snapshots[-1].values())


def test_stream_turn_one_engine_down_the_other_answers(builder, sim_engines):
    runtime = make_runtime(builder, handles=sim_engines)
    dead = runtime.engines[1]
    dead.spec = dataclasses.replace(dead.spec, url_override=f"http://127.0.0.1:{free_port()}")
    dead.process = None  # attached, so its log is not consulted
    final = collect(runtime, turn(runtime, max_tokens=8))[-1]
    assert final["lmcache"].error is None and final["lmcache"].stats is not None
    assert final["plain"].done and final["plain"].stats is None
    assert "does not answer" in final["plain"].error


def test_stream_turn_refused_request_is_shown_per_engine(builder, sim_engines):
    runtime = make_runtime(builder, handles=sim_engines)
    t = turn(runtime, max_tokens=8)
    t.prompt_ids = [5] * (SIM_MAX_MODEL_LEN + 1)  # as if validation had been skipped
    final = collect(runtime, t)[-1]
    for reply in final.values():
        assert reply.done and "refused the request" in reply.error and "maximum context length" in reply.error


def test_edited_system_prompt_is_cached_once(builder, sim_engines):
    runtime = make_runtime(builder, handles=sim_engines)
    first = asyncio.run(runtime.ensure_sys_prompt_cached("You are terse. Answer in five words."))
    again = asyncio.run(runtime.ensure_sys_prompt_cached("You are terse. Answer in five words."))
    assert first is not None and first > 0 and again is None


@pytest.mark.slow
def test_engine_crash_mid_answer_shows_its_log(builder, sim_engines, tmp_path):
    """The 🐢 engine dies while answering: its pane gets the error with its log tail, 🚀 is unaffected."""
    spec = dataclasses.replace(sim_engines["plain"].spec, port=free_port(), sim_speed=0.5)
    process = EngineProcess(spec, tmp_path)
    process.start()
    try:
        process.wait_healthy(60, poll_s=0.1)
        handles = {"lmcache": sim_engines["lmcache"], "plain": EngineHandle(spec, process, SIM_MODEL)}
        runtime = make_runtime(builder, handles=handles)
        t = turn(runtime, max_tokens=64)

        async def go():
            async for replies in stream_turn(runtime, t):
                if replies["plain"].text and process.alive():
                    process.proc.kill()
                    process.proc.wait(timeout=10)
            return replies

        final = asyncio.run(go())
    finally:
        process.stop(grace_s=2)
    assert final["lmcache"].error is None and final["lmcache"].stats is not None
    plain = final["plain"]
    assert plain.done and plain.stats is None and plain.text.startswith("[SIMULATED]")
    assert plain.error.startswith("🐢 plain vLLM crashed") and "exit code -9" in plain.error
    assert "last lines of its log" in plain.error and "SIMULATED plain engine" in plain.error


@pytest.mark.slow
def test_stop_mid_answer_keeps_the_partial_answers_and_aborts_both_requests(builder, sim_engines, tmp_path):
    """The Stop button's cancel, at the session level: the task iterating stream_turn is cancelled while both
    engines stream. Both partial answers are kept and marked stopped, both engines see the client close the
    stream (their requests are aborted, not finished), and the next turn streams normally."""
    slow: dict[str, EngineHandle] = {}
    for key, h in sim_engines.items():  # 30 tok/s: a 64-token answer streams for ~2 s
        spec = dataclasses.replace(h.spec, port=free_port(), sim_speed=0.5)
        slow[key] = EngineHandle(spec, EngineProcess(spec, tmp_path), SIM_MODEL)
    try:
        for h in slow.values():
            h.process.start()
        for h in slow.values():
            h.process.wait_healthy(60, poll_s=0.1)
        runtime = make_runtime(builder, handles=slow)
        assert not runtime.sequential
        max_tokens = 2048
        candidates = [f"What does section {i} say about names?" for i in range(12)]
        t = max((turn(runtime, question=q, names=[], max_tokens=max_tokens) for q in candidates),
                key=lambda t: len(_answer_words(t.prompt_ids, max_tokens, False)))
        full = len(_answer_words(t.prompt_ids, max_tokens, False))
        assert full == 64  # the simulator's longest answer: it ends an answer after 24 to 64 tokens
        replies: dict[str, EngineReply] = {}

        async def consume() -> None:
            async for _ in stream_turn(runtime, t, replies):
                pass

        rid = re.escape(f"cmpl-sim-{_hash(t.prompt_ids)[:8]}-")

        def disconnect(h: EngineHandle) -> re.Match | None:
            return re.search(rid + r"\d+: client disconnected after (\d+) of (\d+) tokens",
                             h.process.log_path.read_text(errors="replace"))

        async def go() -> float:
            task = asyncio.create_task(consume())
            deadline = time.monotonic() + 30
            while not (len(replies) == 2 and all(r.tokens >= 3 for r in replies.values())):
                assert not task.done() and time.monotonic() < deadline, f"both engines streaming: {replies}"
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            task.cancel()  # what Gradio does to the running `stream` event when Stop is clicked
            try:
                await task
            except asyncio.CancelledError:
                pass
            cancel_s = time.monotonic() - t0
            # Each engine logs the client's disconnect mid-answer, while this event loop is blocked (wait_until
            # sleeps): the streams were closed by the time the cancel returned, not left to the loop's teardown.
            for key, h in slow.items():
                m = wait_until(lambda h=h: disconnect(h), 10, f"{key}'s engine to log the client's disconnect")
                sent, total = int(m.group(1)), int(m.group(2))
                assert total == full and replies[key].tokens <= sent < full, (key, m.group(0), replies[key])
            return cancel_s

        cancel_s = asyncio.run(go())
        assert cancel_s < 2, f"closing both streams took {cancel_s:.1f} s"
        for key, reply in replies.items():
            assert reply.stopped and reply.stats is None and reply.error is None, (key, reply)
            assert reply.text.startswith("[SIMULATED]") and 3 <= reply.tokens < full, (key, reply)
            assert len(reply.text.split()) == reply.tokens, (key, reply)  # one word per simulated token
            log = slow[key].process.log_path.read_text(errors="replace")
            assert not re.search(rid + r"\d+: \d+ prompt tokens", log), f"{key}'s engine finished the stopped request"

        # The next turn streams normally.
        final = collect(runtime, turn(runtime, names=[], max_tokens=8))[-1]
        for reply in final.values():
            assert reply.done and not reply.stopped and reply.error is None and reply.stats is not None
            assert reply.tokens == reply.stats.completion_tokens == 8
    finally:
        for h in slow.values():
            h.process.stop(grace_s=2)
