"""kvdemo.blend_oracle's recompute-policy variants (sep_stored, epic<K>, per_chunk, check<L>, question) and their
cost columns, on a tiny random Llama (CPU, seconds). The planning tests need no torch."""

from __future__ import annotations

import random

import pytest

from kvdemo import blend_oracle as bo
from kvdemo.lmcache_patches import selection as sel

BOS, SEP = [1], [90, 91]


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 90) for _ in range(n)]


def _prompt(n_chunks: int = 3, sys_len: int = 9, seed: int = 0) -> bo.BlendPrompt:
    rng = random.Random(seed)
    return bo.blend_layout(BOS, _ids(rng, sys_len), [_ids(rng, 20 + 7 * i) for i in range(n_chunks)], SEP,
                           _ids(rng, 6))


# --------------------------------------------------------------------------------------------------
# Planning (no torch)
# --------------------------------------------------------------------------------------------------


def test_new_keys_and_what_each_sets():
    plan = {v.key: v for v in bo.plan_variants([0.0, 0.15, 1.0], ["exact", "sep_stored", "epic16", "per_chunk",
                                                                   "check2", "question", "question_dev"])}
    assert list(plan) == ["r0/exact", "r0/sep_stored", "r0/epic16",  # ratio 0: epic16 is EPIC alone
                          "r0.15/exact", "r0.15/sep_stored", "r0.15/epic16", "r0.15/per_chunk", "r0.15/check2",
                          "r0.15/question", "r0.15/question_dev",
                          "r1/exact", "r1/sep_stored", "r1/check2"]  # ratio 1: check2 still leaves layers 0-1 loaded
    assert (plan["r0.15/sep_stored"].gaps, plan["r0.15/sep_stored"].selection) == ("stored", "lmcache")
    assert plan["r0.15/epic16"].selection == "epic:16" and sel.parse_policy("epic:16") == sel.Policy("epic", 16)
    assert plan["r0.15/per_chunk"].selection == "per_chunk"
    assert (plan["r0.15/check2"].check, plan["r0.15/check2"].selection) == (2, "lmcache")
    assert plan["r0.15/exact"].check is None and plan["r0.15/exact"].gaps == "zero"


def test_defaults_unchanged_and_unknown_keys_rejected():
    assert bo.VARIANTS == ("exact", "bottom_right", "gaps", "oracle")
    for bad in ("epic0", "epic", "check", "epic<K>", "epic16x", "nope"):
        with pytest.raises(ValueError, match="unknown variant"):
            bo.plan_variants([0.15], [bad])
    assert bo.describe("epic16").startswith("the first 16 tokens of every chunk")
    assert "layer 2" in bo.describe("check2") and "separators" in bo.describe("gaps")


def test_cli_rejects_an_unknown_variant_before_loading_anything(capsys):
    assert bo.main(["--model", "nowhere", "--variants", "exact,epic", "--out", "x.json"]) == 2
    assert "unknown variant 'epic'" in capsys.readouterr().err


def test_recompute_layer_fraction():
    assert bo.recompute_layer_fraction(100, 15, 1, 4) == pytest.approx((100 + 45) / 400)
    assert bo.recompute_layer_fraction(100, 100, 2, 4) == 1.0
    assert bo.recompute_layer_fraction(0, 0, 1, 4) == 0.0


# --------------------------------------------------------------------------------------------------
# On a tiny random Llama (fixtures `tiny`, `tiny_model_dir`: conftest.py)
# --------------------------------------------------------------------------------------------------


def _full(torch, llama, prompt):
    cache = llama.new_cache(1, len(prompt.ids))
    llama.forward(torch.tensor([prompt.ids]), cache)
    return cache


def test_sep_stored_loads_the_separators_kv_from_the_chunks_request(tiny):
    """Layer 0's K of a token depends on it and its position only: the stored SEP, moved, is the full prefill's."""
    torch, _, llama = tiny
    p = _prompt()
    full = _full(torch, llama, p)
    stored = bo.StoredKV(llama)
    zero, kept = stored.load(p), stored.load(p, "stored")
    gaps = list(p.gaps)
    assert float(zero.k[0][gaps].abs().max()) == 0.0
    assert torch.allclose(kept.k[0][gaps], full.k[0][0, gaps], atol=1e-5)
    assert torch.allclose(kept.v[0][gaps], full.v[0][0, gaps], atol=1e-5)
    rest = [i for i in range(p.blend_len) if i not in p.gaps]
    for i in range(len(llama.layers)):
        assert torch.equal(kept.k[i][rest], zero.k[i][rest]) and torch.equal(kept.v[i][rest], zero.v[i][rest])
    with pytest.raises(ValueError):
        stored.load(p, "fresh")


def test_single_chunk_where_it_was_stored_is_exact_with_stored_separators(tiny):
    """[BOS]+SEP+chunk: every loaded row, the separator's included, is the full prefill's (LMCache zeroes it)."""
    torch, _, llama = tiny
    p = _prompt(n_chunks=1, sys_len=0)
    full = _full(torch, llama, p)
    kept = bo.StoredKV(llama).load(p, "stored")
    for i in range(len(llama.layers)):
        assert torch.allclose(kept.k[i], full.k[i][0, :p.blend_len], atol=1e-4), i


def test_check_layer_2_at_ratio_1_fixes_every_layer_from_2_on_only(tiny):
    torch, _, llama = tiny
    p = _prompt()
    full = _full(torch, llama, p)
    t = p.blend_len
    loaded = bo.StoredKV(llama).load(p)
    state = bo.check_state(llama, torch.tensor([p.ids[:t]]), loaded, 2)
    assert len(state.fresh_k) == 2  # layers 0 and 1 computed for every token
    ks, _ = bo.blend(llama, loaded, state, torch.arange(t), "exact", 2)
    assert torch.allclose(ks[2], full.k[2][0, :t], atol=1e-4) and torch.allclose(ks[3], full.k[3][0, :t], atol=1e-4)
    assert torch.equal(ks[1], loaded.k[1])  # as LMCache: the layers before the check layer keep the loaded KV
    assert not torch.allclose(ks[1], full.k[1][0, :t], atol=1e-3)


def test_question_attention_is_the_full_prefills_at_the_check_layer(tiny):
    """The layers before the check layer are computed fully, so the question's attention there is the full
    prefill's own (HF's eager attention weights)."""
    torch, model, llama = tiny
    p = _prompt()
    t = p.blend_len
    ids = torch.tensor([p.ids])
    state = bo.check_state(llama, ids[:, :t], bo.StoredKV(llama).load(p), 1)
    ours = bo.question_attention(llama, state, ids[:, t:], 1)
    model.set_attn_implementation("eager")
    try:
        weights = model(ids, output_attentions=True).attentions[1][0]  # [heads, L, L]
    finally:
        model.set_attn_implementation("sdpa")
    assert ours.shape == (t,)
    assert torch.allclose(ours, weights[:, t:, :t].sum(dim=(0, 1)), atol=1e-5)


def test_run_prompt_policy_rows_and_their_cost(tiny):
    _, _, llama = tiny
    p = _prompt()
    t = p.blend_len
    kinds = ["exact", "gaps", "sep_stored", "epic4", "per_chunk", "check2", "question", "question_dev"]
    variants = bo.plan_variants([0.0, 0.3, 1.0], kinds)
    out = bo.run_prompt(llama, bo.StoredKV(llama), p, variants, 1, answer_tokens=3, rows_per_batch=6)
    assert set(out.results) == set(out.selected) == set(out.layer_fraction) == {v.key for v in variants}
    budget = bo.topk_count(t, 0.3)
    first = sum(min(4, s.length) for s in p.segments[1:])  # not the system prompt's segment at 0
    assert out.selected["r0/epic4"] == first and out.selected["r0/exact"] == 0
    assert out.selected["r0.3/epic4"] == max(budget, first)
    assert out.selected["r0.3/per_chunk"] == out.selected["r0.3/exact"] == out.selected["r0.3/check2"] == budget
    assert out.selected["r0.3/gaps"] >= budget and out.selected["r1/check2"] == t
    assert out.layer_fraction["r0.3/check2"] == pytest.approx(bo.recompute_layer_fraction(t, budget, 2, 4))
    assert out.layer_fraction["r0.3/exact"] == pytest.approx(bo.recompute_layer_fraction(t, budget, 1, 4))
    assert {"r0.3/epic4", "r0.3/per_chunk", "r0.3/check2", "r0.3/question", "r0.3/sep_stored"} <= set(
        out.oracle_overlap)
    assert "r0.3/exact" not in out.oracle_overlap and "r0.3/gaps" not in out.oracle_overlap
    assert all(0.0 <= x <= 1.0 for x in out.oracle_overlap.values())
    assert out.results["r1/check2"].first_token_kl < out.results["r0/exact"].first_token_kl


def test_policies_on_the_models_deviation(tiny):
    """On a real check layer's K deviation: the tensor path (what the oracle and the plugin run) equals the list
    definition, and per_chunk gives the system prompt's segment (exact KV) nothing."""
    torch, _, llama = tiny
    p = _prompt()
    t = p.blend_len
    state = bo.check_state(llama, torch.tensor([p.ids[:t]]), bo.StoredKV(llama).load(p), 1)
    spans = [(s.start, s.start + s.length) for s in p.segments]
    budget = bo.topk_count(t, 0.3)
    for policy in (sel.Policy("epic", 4), sel.Policy("per_chunk"), sel.Policy("first", 8)):
        picked = sel.select_tensor(policy, spans, state.k_deviation, budget).tolist()
        assert picked == sel.select_positions(policy, spans, state.k_deviation.tolist(), budget)
        if policy.kind == "per_chunk":
            assert len(picked) == budget and min(picked) >= p.segments[0].length


def test_run_writes_costs_kinds_and_paired_cost(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir
    result = bo.run(bo.build_parser().parse_args(
        ["--model", str(model_dir), "--prompts", "1", "--ratios", "0,0.15", "--variants", "exact,epic8,per_chunk",
         "--answer-tokens", "2", "--bootstrap-draws", "50", "--no-hf-check", "--out", str(tmp_path / "o.json")]),
        "test", log=lambda s: None)
    assert set(result["variant_kinds"]) == {"exact", "epic8", "per_chunk"}
    rows = {r["variant"]: r for r in result["variants"]}
    assert set(rows) == {"r0/exact", "r0/epic8", "r0.15/exact", "r0.15/epic8", "r0.15/per_chunk"}
    assert rows["r0.15/per_chunk"]["mean_recomputed_tokens"] == rows["r0.15/exact"]["mean_recomputed_tokens"]
    assert rows["r0/epic8"]["mean_recomputed_tokens"] > 0 == rows["r0/exact"]["mean_recomputed_tokens"]
    assert 0 < rows["r0.15/exact"]["mean_recomputed_fraction"] < rows["r0.15/exact"]["mean_recompute_layer_fraction"]
    (prompt,) = result["prompts"]
    assert prompt["recomputed_tokens"]["r0.15/epic8"] == rows["r0.15/epic8"]["mean_recomputed_tokens"]
    paired = {d["variant"]: d for d in result["paired_vs_exact"]}
    assert set(paired) == {"r0/epic8", "r0.15/epic8", "r0.15/per_chunk"}
    assert paired["r0/epic8"]["mean_recomputed_tokens_diff"] == rows["r0/epic8"]["mean_recomputed_tokens"]
    assert paired["r0.15/per_chunk"]["mean_recomputed_tokens_diff"] == 0
