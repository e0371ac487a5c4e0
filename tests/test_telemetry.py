"""Per-answer LMCache telemetry: the app finds the line its LMCache engine wrote for each request it sent."""

from __future__ import annotations

import asyncio
import json

import pytest

from kvdemo.telemetry import LoadRecord, TelemetryReader


def _raw(req_id: str, **extra) -> dict:
    return {"req_id": req_id, "prompt_tokens": 18_000, "lmcache_hit_tokens": 17_950, "vllm_prefix_tokens": 0,
            "loaded_tokens": 17_950, "kv_bytes_loaded": 17_950 * 131_072, "recomputed_tokens": 2_692,
            "load_gpu_ms": 141.2, "load_host_ms": 12.0, "mode": "blend", **extra}


def test_reader_matches_vllm_request_names_and_reads_whole_lines_only(tmp_path):
    path = tmp_path / "lmcache-7.jsonl"
    path.write_text(json.dumps(_raw("cmpl-other-0-abcd1234")) + "\n" + json.dumps(_raw("cmpl-mine-0-0f0f0f0f"))
                    + "\n" + '{"req_id": "cmpl-late-0-1", "prompt')  # a line still being written
    reader = TelemetryReader(tmp_path)
    record = reader.find("mine")
    assert record == LoadRecord.from_json(_raw("cmpl-mine-0-0f0f0f0f"))
    assert record.fresh_tokens == 50
    assert reader.find("late") is None  # half a line is not a record
    with path.open("a") as f:
        f.write('_tokens": 10, "lmcache_hit_tokens": 0, "loaded_tokens": 0}\n')
    assert reader.find("late").prompt_tokens == 10
    assert reader.find("mine") is None  # each record is handed out once
    assert TelemetryReader(tmp_path / "missing").find("x") is None


def test_summary_says_reused_recomputed_fresh_and_load():
    text = LoadRecord.from_json(_raw("r")).summary()
    assert text == ("LMCache reused 17,950 tokens, recomputed 2,692 (15%), computed 50 fresh · "
                    "2.35 GB KV loaded, load + recompute 141 ms GPU")
    sim = LoadRecord.from_json(_raw("r", simulated=True, mode="retrieve", recomputed_tokens=None)).summary()
    assert "recomputed" not in sim and sim.endswith("load 141 ms GPU (SIMULATED)")


def test_records_written_before_mode_was_named_path_still_read():
    old = {k: v for k, v in _raw("r").items() if k != "mode"} | {"path": "retrieve"}
    assert LoadRecord.from_json(old).mode == "retrieve"


def test_simulated_lmcache_engine_records_each_request(sim_engines, builder):
    """The same path as a real engine: X-Request-Id out, the engine's line back, matched per request."""
    lmcache, plain = sim_engines["lmcache"], sim_engines["plain"]
    sys_prompt = "Telemetry test system prompt."
    chunks = list(builder.library.chunks)[:2]
    prompt = builder.build(list(reversed(chunks)), "What is this about?", sys_prompt)

    async def ask(handle, ids, **kw):
        client = handle.client()
        try:
            return (await client.complete(ids, max_tokens=4, **kw))[1]
        finally:
            await client.close()

    async def scenario():
        for ids in builder.precompute_prompts(chunks, sys_prompt):  # precompute, as the app does
            await ask(lmcache, ids)
        return await ask(lmcache, prompt, skip_save=True), await ask(plain, prompt)

    blended, plain_stats = asyncio.run(scenario())
    record = lmcache.load_record(blended.request_id, wait_s=2)
    assert record is not None and record.simulated and record.mode == "blend"
    assert record.prompt_tokens == len(prompt) and record.loaded_tokens == blended.cached_tokens > 0
    assert 0 < record.recomputed_tokens < record.hit_tokens and record.fresh_tokens > 0
    assert "(SIMULATED)" in record.summary()
    assert plain.load_record(plain_stats.request_id) is None  # plain vLLM has no LMCache
    assert lmcache.load_record("never-sent", wait_s=0) is None


@pytest.mark.parametrize("bad", ["not json", '{"no_req_id": 1}'])
def test_reader_skips_garbage(tmp_path, bad):
    (tmp_path / "lmcache-1.jsonl").write_text(bad + "\n" + json.dumps(_raw("cmpl-ok-0-1")) + "\n")
    assert TelemetryReader(tmp_path).find("ok") is not None


def test_reader_keeps_a_bounded_number_of_unclaimed_records_and_serves_threads(tmp_path):
    """Records nobody asks for (precompute, warm-ups) do not pile up; concurrent sessions each get theirs."""
    from concurrent.futures import ThreadPoolExecutor

    lines = [json.dumps(_raw(f"cmpl-r{i}-0-x")) for i in range(50)]
    (tmp_path / "lmcache-1.jsonl").write_text("\n".join(lines) + "\n")
    reader = TelemetryReader(tmp_path, keep=20)
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda i: reader.find(f"r{i}"), range(30, 50)))
    assert all(r is not None for r in found)  # the newest 20 were kept, each handed to its own asker
    assert reader.find("r0") is None and reader.find("r29") is None  # the oldest 30 were dropped
