"""kvdemo.blend_oracle: the torch reference of LMCache's CacheBlend, on a tiny random Llama (CPU, seconds).

The layout/selection tests need no torch; the model tests skip where torch or transformers is absent (run
them with a Python that has both).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pytest

from kvdemo import blend_oracle as bo

BOS, SEP = [1], [90, 91]


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 90) for _ in range(n)]


def test_layout_segments_gaps_and_blend_length():
    p = bo.blend_layout(BOS, [5, 6, 7], [[10, 11], [20, 21, 22]], SEP, [30, 31])
    assert list(p.ids) == [1, 5, 6, 7, 90, 91, 10, 11, 90, 91, 20, 21, 22, 90, 91, 30, 31]
    assert p.blend_len == 13  # through the last chunk: the trailing SEP and the question are prefilled
    assert p.gaps == (4, 5, 8, 9)
    assert [(s.start, s.length, s.offset) for s in p.segments] == [(0, 4, 0), (6, 2, 3), (10, 3, 3)]
    assert p.segments[2].stored == (1, 90, 91, 20, 21, 22)  # [BOS]+SEP+chunk, as precompute stores it


def test_selection_count_is_lmcaches():
    assert bo.topk_count(5497, 0.15) == 824  # the engine's log: "824 recomputed of 5497 tokens"
    assert bo.topk_count(100, 0.001) == 1  # LMCache always takes at least one token
    assert bo.topk_count(100, 0.0) == 0  # ratio 0: not an LMCache setting, nothing recomputed


def test_variants_skip_duplicates_at_ratio_0_and_1():
    keys = [v.key for v in bo.plan_variants([0.0, 0.15, 1.0], bo.VARIANTS)]
    assert keys == ["r0/exact", "r0/gaps", "r0.15/exact", "r0.15/bottom_right", "r0.15/gaps", "r0.15/oracle",
                    "r1/exact", "r1/gaps"]
    with pytest.raises(ValueError):
        bo.plan_variants([0.15], ["nope"])


def test_harness_settings_are_kvdemo_qualitys():
    """The oracle and the bench import the harness's settings from kvdemo.quality (one definition)."""
    from kvdemo import quality as qm
    from kvdemo.blend_oracle import settings

    assert (bo.TOP_K, bo.ANSWER_TOKENS, bo.APPENDED, bo.QUESTIONS_FILE, bo.QUALITY_CONTEXT) == (
        qm.TOP_K, qm.ANSWER_TOKENS, qm.APPENDED, qm.QUESTIONS_FILE, qm.DEFAULT_QUALITY_CONTEXT)
    source = Path(settings.__file__).read_text()
    assert "from ..quality import" in source and "TOP_K = " not in source
    qb = pytest.importorskip("kvdemo.bench.quality")
    p = argparse.ArgumentParser()
    qb.add_quality_flags(p)
    a = p.parse_args([])
    assert tuple(int(x) for x in a.quality_context.split(",")) == bo.QUALITY_CONTEXT
    assert a.seed == 0 and a.answer_max_tokens == qm.ANSWER_MAX_TOKENS and not a.quality_contexts


# --------------------------------------------------------------------------------------------------
# On a tiny random Llama (fixtures `tiny`, `tiny_model_dir`: conftest.py)
# --------------------------------------------------------------------------------------------------


def _prompt(n_chunks: int = 2, sys_len: int = 9, seed: int = 0) -> bo.BlendPrompt:
    rng = random.Random(seed)
    return bo.blend_layout(BOS, _ids(rng, sys_len), [_ids(rng, 20 + 7 * i) for i in range(n_chunks)], SEP,
                           _ids(rng, 6))


def _full(torch, llama, prompt):
    cache = llama.new_cache(1, len(prompt.ids))
    logits = llama.forward(torch.tensor([prompt.ids]), cache)[0]
    return cache, logits


def _blend(torch, llama, prompt, ratio, mask="exact", gaps="zero", check=1):
    stored = bo.StoredKV(llama)
    loaded = stored.load(prompt)
    state = bo.check_state(llama, torch.tensor([prompt.ids[:prompt.blend_len]]), loaded, check)
    sel = bo.select_top(state.k_deviation, bo.topk_count(prompt.blend_len, ratio))
    gap_t = torch.tensor(prompt.gaps, dtype=torch.long)
    if gaps == "fresh":
        sel = torch.unique(torch.cat([sel, gap_t]))
    return bo.blend(llama, loaded, state, sel, mask, check, fresh_gaps=gap_t if gaps == "fresh" else None)


def _first_logprobs(torch, llama, prompt, context):
    row = bo.answer_rows(llama, [lambda: context], prompt, 1)[0]
    return row.first_top


def test_harness_prompts_at_a_context_target(tokenizer):
    """--context-target: the quality harness's prompts of one --quality-contexts size (a real model's sweep)."""
    from kvdemo import quality as qm

    lo, hi = qm.context_band(16000)
    long = bo.harness_prompts(tokenizer, 3, context_target=16000, max_model_len=32768)
    default = bo.harness_prompts(tokenizer, 3)
    assert len(long) == 3 and all(lo <= p.blend_len <= hi for p in long), [p.blend_len for p in long]
    assert all(p.blend_len <= bo.QUALITY_CONTEXT[1] for p in default)
    args = bo.build_parser().parse_args(["--model", "m", "--out", "o.json", "--context-target", "16000",
                                         "--max-model-len", "32768"])
    assert (args.context_target, args.max_model_len) == (16000, 32768)


def test_manual_forward_matches_hf(tiny):
    torch, model, llama = tiny
    p = _prompt()
    _, ours = _full(torch, llama, p)
    hf = model(torch.tensor([p.ids])).logits[0, -1]
    assert torch.allclose(ours, hf, atol=1e-4)


def test_loaded_kv_is_rerotated_to_new_positions(tiny):
    """Layer 0's K depends on the token and its position only: loaded (stored at 3.., moved) == full prefill's."""
    torch, _, llama = tiny
    p = _prompt()
    full, _ = _full(torch, llama, p)
    loaded = bo.StoredKV(llama).load(p)
    seg = p.segments[2]
    rows = slice(seg.start, seg.start + seg.length)
    assert seg.start != seg.offset
    assert torch.allclose(loaded.k[0][rows], full.k[0][0, rows], atol=1e-5)
    assert torch.allclose(loaded.v[0][rows], full.v[0][0, rows], atol=1e-5)
    assert float(loaded.k[0][list(p.gaps)].abs().max()) == 0.0  # LMCache zeroes the separators
    assert not torch.allclose(loaded.k[2][rows], full.k[2][0, rows], atol=1e-3)  # deeper: no cross-attention


def test_ratio_1_equals_full_prefill(tiny):
    torch, _, llama = tiny
    p = _prompt()
    full, _ = _full(torch, llama, p)
    ks, vs = _blend(torch, llama, p, 1.0, gaps="fresh")
    t = p.blend_len
    for i in range(len(llama.layers)):
        assert torch.allclose(ks[i], full.k[i][0, :t], atol=1e-4), i
        assert torch.allclose(vs[i], full.v[i][0, :t], atol=1e-4), i
    ref = _first_logprobs(torch, llama, p, ([k[0, :t] for k in full.k], [v[0, :t] for v in full.v]))
    ours = _first_logprobs(torch, llama, p, (ks, vs))
    assert max(abs(ref[tok] - ours[tok]) for tok in ref) < 1e-4


def test_lmcache_ratio_1_differs_only_by_zero_gaps_at_layer_0(tiny):
    torch, _, llama = tiny
    p = _prompt()
    full, _ = _full(torch, llama, p)
    ks, _ = _blend(torch, llama, p, 1.0)
    t = p.blend_len
    assert torch.allclose(ks[1], full.k[1][0, :t], atol=1e-4)
    assert not torch.allclose(ks[0], full.k[0][0, :t], atol=1e-4)
    keep = [i for i in range(t) if i not in p.gaps]
    assert torch.allclose(ks[0][keep], full.k[0][0, keep], atol=1e-5)


def test_single_chunk_where_it_was_stored_needs_no_recompute(tiny):
    """[BOS]+SEP+chunk+SEP+question: the chunk's stored KV is the full prefill's, so ratio 0 is exact once
    the separator is not zeroed; LMCache's zero gaps alone make it differ."""
    torch, _, llama = tiny
    p = _prompt(n_chunks=1, sys_len=0)
    assert p.segments[1].start == p.segments[1].offset
    full, _ = _full(torch, llama, p)
    t = p.blend_len
    ref = _first_logprobs(torch, llama, p, ([k[0, :t] for k in full.k], [v[0, :t] for v in full.v]))
    ks, vs = _blend(torch, llama, p, 0.0, gaps="fresh")
    for i in range(len(llama.layers)):
        assert torch.allclose(ks[i], full.k[i][0, :t], atol=1e-4), i
    ours = _first_logprobs(torch, llama, p, (ks, vs))
    assert max(abs(ref[tok] - ours[tok]) for tok in ref) < 1e-4
    zero = _first_logprobs(torch, llama, p, _blend(torch, llama, p, 0.0))
    assert max(abs(ref[tok] - zero.get(tok, -99.0)) for tok in ref) > 1e-3


def test_exact_mask_differs_from_bottom_right(tiny):
    torch, _, llama = tiny
    p = _prompt()
    exact_k, _ = _blend(torch, llama, p, 0.3)
    br_k, _ = _blend(torch, llama, p, 0.3, mask="bottom_right")
    assert torch.allclose(exact_k[1], br_k[1])  # the check layer's K: computed before any attention differs
    assert not torch.allclose(exact_k[3], br_k[3], atol=1e-4)


def test_bottom_right_limits_are_flash_attentions():
    torch = pytest.importorskip("torch")
    sel = torch.tensor([2, 5, 6])
    assert bo.query_limits(sel, 10, "exact").tolist() == [2, 5, 6]
    assert bo.query_limits(sel, 10, "bottom_right").tolist() == [7, 8, 9]


def test_run_prompt_scores_every_variant(tiny):
    _, _, llama = tiny
    p = _prompt()
    variants = bo.plan_variants([0.0, 0.3, 1.0], bo.VARIANTS)
    out = bo.run_prompt(llama, bo.StoredKV(llama), p, variants, 1, answer_tokens=4, rows_per_batch=3)
    assert set(out.results) == {v.key for v in variants}
    assert all(r.agree_prefix <= 4 and r.first_token_kl >= 0 for r in out.results.values())
    assert out.self_check["question_path_vs_full_prefill_max_abs_logprob"] < 1e-4
    assert out.results["r1/gaps"].first_token_kl < 1e-5
    assert out.results["r1/gaps"].agree_prefix == 4
    assert out.results["r0/exact"].first_token_kl > out.results["r1/gaps"].first_token_kl
    assert out.selected["r0.3/gaps"] >= out.selected["r0.3/exact"] == bo.topk_count(p.blend_len, 0.3)


def test_paired_differences_against_exact_at_the_same_ratio():
    rows = [{"first_token_kl": {"r0.15/exact": 0.03, "r0.15/bottom_right": 0.02, "r1/exact": 0.0}},
            {"first_token_kl": {"r0.15/exact": 0.05, "r0.15/bottom_right": 0.03, "r1/exact": 0.0}}]
    out = bo.paired_differences(rows, bo.plan_variants([0.15, 1.0], ["exact", "bottom_right"]))
    assert [d["variant"] for d in out] == ["r0.15/bottom_right"]
    assert out[0]["minus"] == "r0.15/exact"
    assert out[0]["first_token_kl_diff"] == pytest.approx(-0.015)
    assert out[0]["first_token_kl_diff_ci"][0] <= -0.015 <= out[0]["first_token_kl_diff_ci"][1]
    assert "mean_agree_prefix_diff" not in out[0]  # those rows carry no agreement


def test_answers_run_past_the_end_of_sequence_token(tiny):
    """As the engine harness's requests (ignore_eos): every answer has exactly answer_tokens tokens, whatever
    ids it generates (the model's EOS included: answer_rows takes no EOS to stop at)."""
    torch, _, llama = tiny
    p = _prompt()
    full, _ = _full(torch, llama, p)
    t = p.blend_len
    context = ([k[0, :t] for k in full.k], [v[0, :t] for v in full.v])
    rows = bo.answer_rows(llama, [lambda: context, lambda: context], p, 40)
    assert [len(r.tokens) for r in rows] == [40, 40] and rows[0].tokens == rows[1].tokens


def test_run_writes_per_prompt_values_intervals_and_the_commit(tmp_path, tiny_model_dir):
    """The whole run on a tiny random Llama with the simulator's tokenizer: the harness's first prompt."""
    model_dir = tiny_model_dir
    out = tmp_path / "oracle.json"
    result = bo.run(bo.build_parser().parse_args(["--model", str(model_dir), "--prompts", "1", "--ratios", "0.15,1.0",
                                                  "--variants", "exact,bottom_right", "--answer-tokens", "4",
                                                  "--bootstrap-draws", "200", "--out", str(out)]),
                    "test", log=lambda s: None)
    assert out.is_file() and result["bootstrap"]["draws"] == 200 and "kvdemo_commit" in result
    assert set(result["per_prompt"]) == {"r0.15/exact", "r0.15/bottom_right", "r1/exact"}
    assert {"first_token_kl", "first_token_kl_partial_topk", "agree_prefix"} <= set(result["per_prompt"]["r1/exact"][0])
    assert result["answers_stop_at_eos"] is False
    (diff,) = result["paired_vs_exact"]
    assert diff["variant"] == "r0.15/bottom_right" and len(diff["first_token_kl_diff_ci"]) == 2
