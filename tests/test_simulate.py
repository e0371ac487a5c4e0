"""The simulated engine as the app sees it: a real HTTP subprocess, driven through kvdemo.client.

Each test uses its own system prompt (the first segment of every prompt), so no test reuses another's cache.
Timings are compared by their gaps: at least half the gap the simulator's cost model sleeps for.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import httpx
import pytest
from conftest import SIM_MAX_MODEL_LEN, SIM_MODEL, SIM_SPEED
from helpers import free_port

from kvdemo.client import EngineClient, Finished, RequestStats, TextDelta
from kvdemo.errors import EngineError, UserFacingError
from kvdemo.simulate import CostModel

QUESTION = "Which statement binds a name in the enclosing function scope?"


def unique_sys_prompt() -> str:
    return f"You answer questions about Python. Session {uuid.uuid4().hex}."


def ask(handle, ids: list[int], max_tokens: int = 1, **kw) -> tuple[str, RequestStats]:
    async def go():
        client = handle.client()
        try:
            return await client.complete(ids, max_tokens=max_tokens, **kw)
        finally:
            await client.close()

    return asyncio.run(go())


def ttft(handle, ids: list[int], **kw) -> float:
    return ask(handle, ids, **kw)[1].ttft_s


@pytest.fixture(scope="module")
def long_context(builder) -> list[str]:
    """The app's default selection (~18K tokens): long enough for blending to pay off clearly."""
    return builder.default_selection(16_000, SIM_MAX_MODEL_LEN - 512)


def test_health_and_models(sim_engines):
    for h in sim_engines.values():
        assert httpx.get(f"{h.spec.url}/health", timeout=5).status_code == 200
        models = httpx.get(f"{h.spec.url}/v1/models", timeout=5).json()
        assert models["data"][0]["id"] == SIM_MODEL
        assert models["data"][0]["max_model_len"] == SIM_MAX_MODEL_LEN
        assert h.process.alive()


def test_streaming_deltas_and_timings(sim_engines, builder, library):
    ids = builder.build(list(library.chunks)[:2], QUESTION, unique_sys_prompt())

    async def go():
        client = sim_engines["plain"].client()
        events, arrivals = [], []
        try:
            start = time.perf_counter()
            async for event in client.stream(ids, max_tokens=40, ignore_eos=True):
                events.append(event)
                arrivals.append(time.perf_counter() - start)
        finally:
            await client.close()
        return events, arrivals

    events, arrivals = asyncio.run(go())
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert isinstance(events[-1], Finished) and not any(isinstance(e, Finished) for e in events[:-1])
    assert len(deltas) == 40  # one word per token, streamed one by one
    text = "".join(d.text for d in deltas)
    assert text.startswith("[SIMULATED]")
    stats = events[-1].stats
    assert stats.completion_tokens == 40 and stats.prompt_tokens == len(ids)
    assert 0 < stats.ttft_s < stats.total_s
    assert stats.ttft_s <= arrivals[0] + 0.05  # TTFT is the first token's arrival
    assert arrivals[-2] - arrivals[0] > 0.1  # tokens really arrive over time (decode is simulated)
    assert stats.decode_tok_s and stats.decode_tok_s > 0


def test_answer_is_deterministic_and_respects_max_tokens(sim_engines, builder, library):
    ids = builder.build(list(library.chunks)[:1], QUESTION, unique_sys_prompt())
    a, sa = ask(sim_engines["lmcache"], ids, max_tokens=5)
    b, sb = ask(sim_engines["lmcache"], ids, max_tokens=5)
    assert a == b and sa.completion_tokens == sb.completion_tokens == 5
    _, stats = ask(sim_engines["lmcache"], ids, max_tokens=200)
    assert 24 <= stats.completion_tokens <= 64  # a simulated EOS unless ignore_eos


def model_s(n_tokens: int, computed: int, blended: bool = False) -> float:
    """The simulator's cost model: TTFT it sleeps for a prompt of n_tokens with `computed` not reused."""
    c = CostModel(speed=SIM_SPEED)
    seconds = c.base_s + computed * c.prefill_s_per_token
    reused = n_tokens - computed
    if blended and reused:
        seconds += c.blend_overhead_s + reused * (c.recompute_ratio * c.prefill_s_per_token + c.load_s_per_token)
    return c.scaled(seconds)


def assert_faster(fast: float, slow: float, modelled_gap: float, what: str) -> None:
    """`fast` beats `slow` by at least half the modelled gap (client overhead adds the same to both)."""
    assert modelled_gap > 0.05
    assert slow - fast > modelled_gap / 2, f"{what}: {fast:.3f} s vs {slow:.3f} s, modelled gap {modelled_gap:.3f} s"


def test_plain_engine_reuses_only_an_identical_prefix(sim_engines, builder, long_context):
    plain = sim_engines["plain"]
    sys_prompt = unique_sys_prompt()
    ids = builder.build(long_context, QUESTION, sys_prompt)
    n, n_sys = len(ids), len(builder.bos_ids + builder.sys_ids(sys_prompt))
    cold = ttft(plain, ids)
    repeat = ttft(plain, ids)
    reordered = ttft(plain, builder.build(long_context[::-1], QUESTION, sys_prompt))
    assert_faster(repeat, cold, model_s(n, n) - model_s(n, 16), "identical prompt vs cold")
    # Reordered: only the blocks of the system prompt are a common prefix.
    assert_faster(repeat, reordered, model_s(n, n - n_sys) - model_s(n, 16), "identical vs reordered")
    assert abs(reordered - cold) < (model_s(n, n) - model_s(n, 16)) / 2, (cold, reordered)


def test_plain_engine_prefix_cache_resets_as_vllms_dev_endpoint(sim_engines, builder, library):
    plain = sim_engines["plain"]
    ids = builder.build(list(library.chunks)[:1], QUESTION, unique_sys_prompt())
    ask(plain, ids)
    assert ask(plain, ids)[1].cached_tokens > 0
    assert httpx.post(f"{plain.spec.url}/reset_prefix_cache", timeout=5).status_code == 200
    assert ask(plain, ids)[1].cached_tokens == 0  # cold again


def test_lmcache_engine_blends_reordered_chunks_after_precompute(sim_engines, builder, long_context):
    lm = sim_engines["lmcache"]
    sys_prompt = unique_sys_prompt()
    order = long_context[:]
    random.Random(7).shuffle(order)
    assert order != long_context
    reordered = builder.build(order, QUESTION, sys_prompt)
    n, n_question = len(reordered), len(builder.question_ids(QUESTION))
    cold = ttft(lm, reordered, skip_save=True)
    for prompt in builder.precompute_prompts(long_context, sys_prompt):
        ask(lm, prompt, max_tokens=1)
    warm = ttft(lm, reordered, skip_save=True)
    # Every segment but the question is reused (SEP ids are not part of any segment).
    n_reused = n - n_question - len(builder.sep_ids) * (len(order) + 1)
    assert_faster(warm, cold, model_s(n, n) - model_s(n, n - n_reused, blended=True), "blended vs cold")
    # The plain engine, given the same precompute requests, cannot reuse the reordered chunks.
    plain = sim_engines["plain"]
    for prompt in builder.precompute_prompts(long_context, sys_prompt):
        ask(plain, prompt, max_tokens=1)
    assert ttft(plain, reordered) > warm, "🐢 should not blend reordered chunks"


def test_skip_save_is_honoured(sim_engines, builder, library):
    lm = sim_engines["lmcache"]
    ids = builder.build(list(library.chunks)[3:9], QUESTION, unique_sys_prompt())
    gap = model_s(len(ids), len(ids)) - model_s(len(ids), 0, blended=True)
    first = ttft(lm, ids, skip_save=True)
    second = ttft(lm, ids, skip_save=True)  # nothing was stored: still cold
    assert second > first - gap / 2, (first, second)
    ttft(lm, ids)  # stores every segment
    warm = ttft(lm, ids, skip_save=True)
    assert_faster(warm, second, gap, "stored vs skip_save")


def test_too_long_prompt_is_a_user_facing_error_with_the_length(sim_engines, builder, library):
    ids = builder.build(list(library.chunks), QUESTION)  # every chunk: over 32K tokens
    assert len(ids) > SIM_MAX_MODEL_LEN
    for h in sim_engines.values():
        with pytest.raises(UserFacingError) as exc:
            ask(h, ids, max_tokens=16)
        msg = str(exc.value)
        assert not isinstance(exc.value, EngineError)
        assert f"{h.spec.label} refused the request" in msg
        assert f"maximum context length is {SIM_MAX_MODEL_LEN}" in msg and f"{len(ids)} in the messages" in msg
        assert h.process.alive()


def test_prompt_plus_max_tokens_over_the_limit(sim_engines):
    ids = [5] * (SIM_MAX_MODEL_LEN - 10)
    with pytest.raises(UserFacingError, match=f"requested {SIM_MAX_MODEL_LEN + 10} tokens"):
        ask(sim_engines["plain"], ids, max_tokens=20)


def test_text_prompt_is_refused(sim_engines):
    r = httpx.post(f"{sim_engines['plain'].spec.url}/v1/completions", timeout=10,
                   json={"model": SIM_MODEL, "prompt": "text, not ids", "max_tokens": 4})
    assert r.status_code == 400 and "token-id prompts" in r.json()["message"]


def test_unreachable_engine_is_an_engine_error():
    async def go():
        client = EngineClient(f"http://127.0.0.1:{free_port()}", "ghost", "ghost", timeout_s=5)
        try:
            await client.complete([1, 2, 3])
        finally:
            await client.close()

    with pytest.raises(EngineError, match="ghost at http://127.0.0.1:.* does not answer"):
        asyncio.run(go())


def test_a_hit_on_the_system_prompt_alone_is_prefilled_not_blended(sim_engines, builder):
    """blend.yaml's min_retrieve_tokens (1024): LMCache prefills a short hit instead of loading it, so a
    question whose only stored segment is the system prompt reports no reuse."""
    from kvdemo.bench.protocol import synthetic_chunks

    lm = sim_engines["lmcache"]
    sys_ids = builder.sys_ids(unique_sys_prompt())
    chunks = synthetic_chunks(builder, 2, 1500, uuid.uuid4().hex[:8])  # never stored by another test
    ids = builder.assemble(sys_ids, chunks, builder.question_ids(QUESTION))
    layout = builder.precompute_layout(sys_ids, chunks)
    ask(lm, layout[0])  # stores the system prompt only
    _, short = ask(lm, ids, skip_save=True)
    assert short.cached_tokens == 0
    for prompt in layout[1:]:
        ask(lm, prompt)
    _, full = ask(lm, ids, skip_save=True)
    assert full.cached_tokens and full.cached_tokens > 3000
