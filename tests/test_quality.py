"""Answer-quality metrics (kvdemo.quality), the committed question set, and the quality benchmark run end to
end against simulated engines (the plumbing only: simulated log-probs are made up and labelled so)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from helpers import REPO_ROOT, free_ports

from kvdemo import bench, quality, revision
from kvdemo.bench import quality as quality_bench
from kvdemo.errors import UserFacingError
from kvdemo.prompts import ChunkLibrary

# --------------------------------------------------------------------------------------------------
# Divergences
# --------------------------------------------------------------------------------------------------


def _logprobs(rng: random.Random, vocab: int, sharpness: float) -> dict[int, float]:
    logits = [rng.gauss(0, sharpness) for _ in range(vocab)]
    norm = math.log(sum(math.exp(x) for x in logits))
    return {tok: x - norm for tok, x in enumerate(logits)}


def _top(dist: dict[int, float], k: int) -> dict[int, float]:
    return dict(sorted(dist.items(), key=lambda kv: -kv[1])[:k])


def test_coarse_kl_is_zero_for_equal_inputs_without_renormalising():
    ref = {1: math.log(0.5), 2: math.log(0.2), 3: math.log(0.1)}  # top-3 mass 0.8: not renormalised
    assert quality.coarse_kl(ref, dict(ref)) == 0.0
    peaked = {1: math.log(1 - 1e-9), 2: math.log(5e-10), 3: math.log(4e-10)}  # rest 1e-10 < REST_FLOOR
    assert quality.coarse_kl(peaked, dict(peaked)) == 0.0
    over = {1: 0.0, 2: math.log(1e-7)}  # rounding: the top-k sums past 1
    assert quality.coarse_kl(over, dict(over)) == 0.0


def test_coarse_kl_is_never_negative_where_the_partial_sum_is():
    ref, other = {1: math.log(0.5)}, {1: math.log(0.6)}  # q gives the top token more mass
    assert quality.partial_topk_kl(ref, other) < 0
    want = 0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.4)  # top token + rest bucket
    assert quality.coarse_kl(ref, other) == pytest.approx(want)
    rng = random.Random(1)
    for _ in range(300):  # both sides top-k only: missing tokens imputed, still a KL
        vocab = rng.randrange(21, 60)
        p, q = _logprobs(rng, vocab, rng.uniform(0.3, 6)), _logprobs(rng, vocab, rng.uniform(0.3, 6))
        assert quality.coarse_kl(_top(p, 20), _top(q, 20)) >= 0.0


def test_coarse_kl_matches_brute_force_and_bounds_the_full_kl():
    """The other side given in full (no imputation): the coarse KL equals the KL of the two distributions
    coarsened by hand to the reference's top-k + rest, and never exceeds the full KL."""
    rng = random.Random(7)
    for _ in range(300):
        vocab = rng.randrange(5, 50)
        k = rng.randrange(1, min(20, vocab - 1) + 1)
        p, q = _logprobs(rng, vocab, rng.uniform(0.2, 5)), _logprobs(rng, vocab, rng.uniform(0.2, 5))
        top = _top(p, k)
        full = sum(math.exp(p[t]) * (p[t] - q[t]) for t in p)
        p_rest = 1 - sum(math.exp(p[t]) for t in top)
        q_rest = 1 - sum(math.exp(q[t]) for t in top)
        by_hand = sum(math.exp(p[t]) * (p[t] - q[t]) for t in top) + p_rest * math.log(p_rest / q_rest)
        got = quality.coarse_kl(top, q)
        assert got == pytest.approx(by_hand, rel=1e-9, abs=1e-12)
        assert 0.0 <= got <= full + 1e-12


def test_partial_kl_uses_raw_logprobs_and_a_floor_for_missing_tokens():
    ref = {1: math.log(0.6), 2: math.log(0.3)}
    other = {1: math.log(0.5), 3: math.log(0.2), 4: math.log(0.1)}
    floor = math.log(0.1) - 1.0  # token 2 is missing: the other side's last log-prob minus 1
    want = 0.6 * (math.log(0.6) - math.log(0.5)) + 0.3 * (math.log(0.3) - floor)
    assert quality.partial_topk_kl(ref, other) == pytest.approx(want)
    q2 = math.exp(floor)  # the same imputation in the coarse KL
    coarse = (0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / q2) + 0.1 * math.log(0.1 / (1 - 0.5 - q2)))
    assert quality.coarse_kl(ref, other) == pytest.approx(coarse)
    with pytest.raises(ValueError):
        quality.coarse_kl(ref, {})


def test_token_ids_parse_from_vllm_strings():
    assert quality.parse_token("token_id:42") == 42
    assert quality.parse_top_logprobs({"token_id:7": -0.1, "token_id:9": -2.5}) == {7: -0.1, 9: -2.5}
    with pytest.raises(ValueError, match="return_tokens_as_token_ids"):
        quality.parse_token("Hello")


def test_identical_prefix_and_compare():
    assert quality.identical_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert quality.identical_prefix([], [1]) == 0
    ref = quality.Scored([5, 6, 7], {5: -0.1, 8: -3.0})
    same = quality.compare(ref, ref, {8: {1: -0.2}}, {8: {1: -0.2}})
    assert same.identical and same.agree_prefix == 3 and same.first_token_kl == 0.0 and same.kl_at == {8: 0.0}
    drift = quality.compare(ref, quality.Scored([5, 9, 7], {5: -0.3, 8: -1.5}), {8: {1: -0.2}}, {8: {1: -1.0}})
    assert not drift.identical and drift.agree_prefix == 1 and drift.first_token_kl > 0 and drift.kl_at[8] > 0
    assert drift.first_token_kl_partial_topk == pytest.approx(quality.partial_topk_kl(ref.first_top,
                                                                                      {5: -0.3, 8: -1.5}))
    late = quality.compare(quality.Scored([1] * 40, {1: -0.1}), quality.Scored([1] * 32 + [2] * 8, {1: -0.1}), {}, {})
    assert late.identical and late.agree_prefix == quality.ANSWER_TOKENS  # agreement over the compared tokens


# --------------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------------


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    values = [0.01 * i for i in range(40)]
    mean, lo, hi = quality.bootstrap_mean_ci(values, seed=3)
    assert lo < mean < hi and mean == pytest.approx(0.195)
    assert quality.bootstrap_mean_ci(values, seed=3) == (mean, lo, hi)
    assert quality.bootstrap_mean_ci([2.0]) == (2.0, 2.0, 2.0)
    narrow = quality.bootstrap_mean_ci([0.195] * 40)
    assert narrow[1] == narrow[2] == pytest.approx(0.195)


def test_paired_bootstrap_cancels_the_prompt_to_prompt_spread():
    rng = random.Random(0)
    hardness = [rng.uniform(0, 0.1) for _ in range(40)]  # prompts differ far more than the variants do
    a = [h + 0.002 + rng.gauss(0, 0.0005) for h in hardness]
    b = list(hardness)
    mean, lo, hi = quality.paired_bootstrap_ci(a, b, draws=1000, seed=5)
    assert mean == pytest.approx(0.002, abs=0.0003) and 0 < lo < mean < hi
    _, ua_lo, ua_hi = quality.bootstrap_mean_ci(a, draws=1000, seed=5)
    _, _, ub_hi = quality.bootstrap_mean_ci(b, draws=1000, seed=5)
    assert hi - lo < (ua_hi - ua_lo) / 10  # unpaired intervals overlap; the paired one excludes 0
    assert ua_lo < ub_hi
    assert quality.paired_bootstrap_ci(b, b) == (0.0, 0.0, 0.0)
    assert quality.paired_bootstrap_ci(a, b, draws=1000, seed=5) == (mean, lo, hi)
    with pytest.raises(ValueError, match="same prompts"):
        quality.paired_bootstrap_ci(a, b[:-1])
    boot = quality.Bootstrap(draws=1000, seed=5)
    assert boot.diff(a, b) == {"mean": mean, "ci": [lo, hi]}
    assert {"seed": 5, "draws": 1000}.items() <= boot.as_json().items()


def test_summarize_has_the_result_keys():
    results = [quality.PromptResult(0.01 * i, 0.01 * i - 0.001, {8: 0.001, 16: 0.002}, i % 33, i % 33 == 32,
                                    f1=0.5, cited=i % 2 == 0) for i in range(40)]
    s = quality.summarize(results)
    assert {"first_token_kl", "first_token_kl_ci", "first_token_kl_partial_topk", "kl_at_8", "kl_at_16",
            "greedy32_agree", "mean_agree_prefix", "mean_agree_prefix_ci", "n_prompts", "f1", "f1_ci", "cite_acc",
            "cite_acc_ci"} <= set(s)
    assert s["greedy32_agree"] == pytest.approx(1 / 40) and s["cite_acc"] == 0.5 and s["f1"] == 0.5
    assert "f1" not in quality.summarize([quality.PromptResult(0.0, 0.0, {}, 3, True)])
    row = results[3].as_json()
    assert row["kl_at_8"] == 0.001 and "kl_at" not in row and row["cited"] is False


# --------------------------------------------------------------------------------------------------
# Answer text: F1 and citation
# --------------------------------------------------------------------------------------------------


def test_token_f1_is_squads():
    assert quality.normalize_answer("The `try` statement — see “Naming and binding”!") == \
        "try statement see naming and binding"
    gold = "The memory address where x is stored."
    assert quality.token_f1("the memory address where X is stored", gold) == 1.0
    assert quality.token_f1("an address in memory", gold) == pytest.approx(2 * (2 / 3) * (2 / 6) / (2 / 3 + 2 / 6))
    assert quality.token_f1("no idea", gold) == 0.0
    assert quality.token_f1("", "") == 1.0 and quality.token_f1("the", gold) == 0.0


def test_headings_of_the_committed_chunks():
    library = ChunkLibrary.load(REPO_ROOT / "data")
    heads = {name: quality.chunk_headings(c.text) for name, c in library.chunks.items()}
    assert all(len(h) >= 3 for h in heads.values())
    assert heads["08-exceptions"][:3] == ["Exceptions: the raise and try statements", 'The "raise" statement',
                                          'The "try" statement']
    assert '"finally" clause' in heads["08-exceptions"]
    assert heads["01-data-model"][:3] == ["Data model: objects, values and basic customization", "Data model",
                                          "Objects, values and types"]
    assert "Naming and binding" in heads["06-names-scopes"]  # the system prompt's own examples are headings


def test_citation_names_a_heading_of_the_answering_chunk():
    heads = ['The "try" statement', '"finally" clause', "Exceptions"]
    assert quality.cites_chunk('It raises again (see The "try" statement).', heads)
    assert quality.cites_chunk("As the try statement section says, ...", heads)
    assert quality.cites_chunk("See the finally clause.", heads)
    assert quality.cites_chunk("Section: Exceptions.", heads)
    assert not quality.cites_chunk("It re-raises exceptions after trying again.", heads)  # lower-case common word
    assert not quality.cites_chunk("See Naming and binding.", heads)
    assert quality.until_stop([5, 6, 2, 7, 2], {2}) == [5, 6] and quality.until_stop([5], {2}) == [5]


# --------------------------------------------------------------------------------------------------
# The question set, prompt sampling and provenance
# --------------------------------------------------------------------------------------------------


def test_committed_question_set_names_real_chunks():
    library = ChunkLibrary.load(REPO_ROOT / "data")
    questions = quality.load_questions(quality.QUESTIONS_FILE, list(library.chunks))
    assert len(questions) >= 40
    assert {q.chunk for q in questions} == set(library.chunks)  # every chunk is asked about
    for q in questions:
        assert q.question.strip().endswith("?") and q.answer.strip()
    assert quality_bench.QUESTIONS_FILE == quality.QUESTIONS_FILE


def test_bad_question_lines_say_where(tmp_path: Path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": "a", "chunk": "nope", "question": "x?", "answer": "y"}\n')
    with pytest.raises(ValueError, match="line 1: chunk 'nope'"):
        quality.load_questions(bad, ["01-data-model"])
    bad.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="line 1: needs JSON"):
        quality.load_questions(bad, ["01-data-model"])


def test_prompts_hold_the_answering_chunk_within_the_token_bounds():
    chunks = {f"c{i}": 2500 + 100 * i for i in range(8)}
    qs = [quality.Question(f"q{i}", f"c{i % 8}", "why?", "because") for i in range(20)]
    prompts = quality.sample_prompts(qs, chunks, fixed_tokens=100, n=30, min_tokens=4000, max_tokens=7000, seed=1)
    assert len(prompts) == 30
    orders = set()
    for p in prompts:
        total = 100 + sum(chunks[c] for c in p.chunks)
        assert 4000 <= total <= 7000 and p.question.chunk in p.chunks and len(set(p.chunks)) == len(p.chunks)
        orders.add(p.chunks)
    assert len(orders) > 10  # random subsets and orders
    assert quality.sample_prompts(qs, chunks, 100, 30, 4000, 7000, seed=1) == prompts
    with pytest.raises(ValueError, match="cannot build prompts"):
        quality.sample_prompts(qs, chunks, 100, 5, 1000, 2000)  # every chunk alone is longer


def test_context_bands_and_the_prompt_budget():
    assert quality.context_band(8000) == (6500, 9500)
    assert quality.context_band(30000) == (25500, 34500)
    assert quality.prompt_budget(8192) == 8192 - quality.ANSWER_MAX_TOKENS - quality.PROMPT_MARGIN
    assert quality.prompt_budget(8192, answer_max_tokens=16) == 8192 - max(quality.APPENDED) - 1 - 64


def test_source_revision_names_this_checkout(monkeypatch):
    rev = revision.source_revision()
    assert set(rev) == {"kvdemo_commit", "kvdemo_tree_dirty"}
    if rev["kvdemo_commit"] is not None:
        assert len(rev["kvdemo_commit"]) == 40 and isinstance(rev["kvdemo_tree_dirty"], bool)
    monkeypatch.setenv(revision.ENV_COMMIT, "abc123")  # wins over a .git (the GPU machine's may be older)
    assert revision.source_revision() == {"kvdemo_commit": "abc123", "kvdemo_tree_dirty": None}
    monkeypatch.delenv(revision.ENV_COMMIT)
    monkeypatch.setattr(revision, "_git", lambda *args: None)  # a copy of the tree without .git
    assert revision.source_revision() == {"kvdemo_commit": None, "kvdemo_tree_dirty": None}


# --------------------------------------------------------------------------------------------------
# End to end against simulated engines
# --------------------------------------------------------------------------------------------------


def test_quality_bench_against_simulated_engines(tmp_path: Path):
    ports = free_ports(7)
    result = bench.run(["--quality", "--simulate", "--sim-speed", "50", "--max-model-len", "8192",
                        "--ratios", "0.15,1.0", "--baseline-fixes", "all,-mask", "--equivalence-ratios", "1.0",
                        "--prompts", "5", "--bootstrap-draws", "500", "--port", str(ports[0]),
                        "--engine-ports", ",".join(map(str, ports[1:])), "--out", str(tmp_path / "out"),
                        "--log-dir", str(tmp_path / "logs")])
    out = tmp_path / "out"
    written = json.loads((out / "quality-simulated.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert (out / "quality-simulated.png").stat().st_size > 10_000
    baseline = json.loads((out / "steps" / "quality-nomask-simulated.json").read_text())
    assert written["simulated"] is True and written["weights"] == "simulated"
    assert {"device", "versions", "kvdemo_commit", "model", "command", "n_prompts", "context_tokens", "contexts",
            "control", "sweep", "fix_equivalence", "mask_comparison", "per_prompt", "bootstrap", "cold_check",
            "f1_full", "cite_acc_full", "answer_max_tokens"} <= set(written)
    assert "kvdemo_commit" in baseline and baseline["bootstrap"] == written["bootstrap"]
    assert written["bootstrap"]["draws"] == 500 and written["bootstrap"]["seed"] == 0
    assert written["n_prompts"] == 5 and 4000 <= written["context_tokens"]["min"] <= 7000
    (ctx,) = written["contexts"]
    assert ctx["label"] == "4000-7000" and ctx["n_prompts"] == 5 and "f1_full" in ctx
    by_ratio = {r["recompute_ratio"]: r for r in written["sweep"]}
    assert set(by_ratio) == {0.15, 1.0} and [r["recompute_ratio"] for r in baseline["sweep"]] == [0.15, 1.0]
    for row in written["sweep"] + baseline["sweep"]:
        assert {"first_token_kl", "first_token_kl_ci", "first_token_kl_partial_topk", "kl_at_8", "kl_at_16",
                "kl_at_32", "greedy32_agree", "mean_agree_prefix", "mean_agree_prefix_ci", "blend_ttft_s",
                "full_ttft_s", "first_token_kl_minus_control", "first_token_kl_minus_control_ci", "f1", "f1_diff",
                "f1_diff_ci", "cite_acc", "cite_acc_diff_ci", "context"} <= set(row)
        assert row["blend_ttft_s"] > 0 and row["full_ttft_s"] > 0
    # per-prompt values of every variant, in prompt order
    assert set(written["per_prompt"]) == {"full", "control", "r0.15", "r1", "r0.15-baseline", "r1-baseline",
                                          "r1-minimal"}
    assert all(len(v) == 5 for v in written["per_prompt"].values())
    assert set(baseline["per_prompt"]) == {"full", "control", "r0.15-baseline", "r1-baseline"}
    # the control: the reference cold (prefix cache reset before each request), the control a prefix hit
    check = written["cold_check"]
    assert check["reference_requests"] == check["control_requests"] == 5 * (1 + len(quality.APPENDED))
    assert check["reference_requests_with_cached_tokens"] == 0 and check["control_requests_without_cached_tokens"] == 0
    assert all(n == 0 for p in written["per_prompt"]["full"] for n in p["cached_tokens"])
    assert all(n > 0 for p in written["per_prompt"]["control"] for n in p["cached_tokens"])
    # the simulator drifts a blended answer by (1 - ratio): none at 1.0, some at 0.15; the control is exact
    assert written["control"]["first_token_kl"] == 0.0
    assert by_ratio[1.0]["first_token_kl"] == 0.0 and by_ratio[0.15]["first_token_kl"] > 0.0
    assert by_ratio[0.15]["first_token_kl_minus_control_ci"][0] > 0
    assert by_ratio[0.15]["mean_agree_prefix"] < by_ratio[1.0]["mean_agree_prefix"] == 32
    assert by_ratio[1.0]["f1_diff"] == 0.0 and by_ratio[1.0]["f1"] == written["f1_full"]
    assert [m["recompute_ratio"] for m in written["mask_comparison"]] == [0.15, 1.0]
    (eq,) = written["fix_equivalence"]
    assert eq["recompute_ratio"] == 1.0 and eq["fixes_minimal"] == "register,mistral,split,mask,telemetry" and eq["passed"]
    assert eq["bound_nats"] == quality.EQUIVALENCE_BOUND_NATS and eq["first_token_kl_diff_ci"] == [0.0, 0.0]
    assert "telemetry" not in eq["speed_fixes_compared"] and "kernels" in eq["speed_fixes_compared"]
    # evidence: every measured request of every LMCache engine found in its telemetry
    for key, ev in written["evidence"].items():
        assert ev["requests"]["measured"] == ev["requests"]["recorded"] == ev["requests"]["blended"] == 20, key
        assert ev["kvdemo_warning_count"] == 0


def test_quality_bench_with_several_context_sizes(tmp_path: Path):
    ports = free_ports(3)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"model_sha256": "ab" * 32, "gguf": {"general.architecture": "qwen2"}}))
    result = bench.run(["--quality", "--simulate", "--sim-speed", "50", "--max-model-len", "8192",
                        "--ratios", "1.0", "--equivalence-ratios", "", "--quality-contexts", "3000,6000",
                        "--prompts", "2", "--bootstrap-draws", "200", "--model-meta", str(meta),
                        "--port", str(ports[0]), "--engine-ports", ",".join(map(str, ports[1:])),
                        "--out", str(tmp_path / "out"), "--log-dir", str(tmp_path / "logs")])
    assert [c["label"] for c in result["contexts"]] == ["3000", "6000"]
    assert [c["band"] for c in result["contexts"]] == [[1500, 4500], [4500, 7500]]
    for c in result["contexts"]:
        assert c["n_prompts"] == 2 and c["band"][0] <= c["context_tokens"]["min"] <= c["context_tokens"]["max"] \
            <= c["band"][1]
    assert [(r["context"], r["recompute_ratio"]) for r in result["sweep"]] == [("3000", 1.0), ("6000", 1.0)]
    assert [p["context"] for p in result["prompts"]] == ["3000", "3000", "6000", "6000"]
    assert result["n_prompts"] == 4 and len(result["per_prompt"]["r1"]) == 4
    assert result["model_sha256"] == "ab" * 32 and result["model_meta"]["gguf"]["general.architecture"] == "qwen2"
    assert result["fix_equivalence"] == [] and "mask_comparison" not in result


@pytest.mark.parametrize(("flags", "message"), [
    (["--ratios", "0.15,abc"], "--ratios takes recompute ratios"),
    (["--ratios", "0,1.0"], "--ratios takes recompute ratios"),
    (["--equivalence-ratios", "2"], "--equivalence-ratios takes recompute ratios"),
    (["--equivalence-ratios", "0.25"], "must also be in --ratios"),
    (["--quality-context", "7000"], "--quality-context takes min,max"),
    (["--quality-context", "7000,4000"], "--quality-context takes min,max"),
    (["--quality-contexts", "8k"], "--quality-contexts takes token counts"),
    (["--quality-contexts", "12000", "--max-model-len", "8192"], "context 12000: .* need --max-model-len"),
    (["--prompts", "0"], "--prompts must be at least 1"),
    (["--answer-max-tokens", "8"], "--answer-max-tokens must be at least 32"),
    (["--equivalence-bound", "0"], "--equivalence-bound takes a positive"),
    (["--model-meta", "/nonexistent/meta.json"], "--model-meta /nonexistent/meta.json: no such file"),
])
def test_quality_bench_refuses_bad_flags_in_one_line(tmp_path: Path, flags: list[str], message: str):
    with pytest.raises(UserFacingError, match=message):
        bench.run(["--quality", "--simulate", "--out", str(tmp_path), *flags])


def test_simulated_quality_never_goes_to_benchmarks_results():
    with pytest.raises(UserFacingError, match="GPU measurements only"):
        bench.run(["--quality", "--simulate"])
