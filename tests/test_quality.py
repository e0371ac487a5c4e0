"""Answer-quality metrics (kvdemo.quality), the committed question set, and the quality benchmark run end to
end against simulated engines (the plumbing only: simulated log-probs are made up and labelled so)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import REPO_ROOT, free_ports

from kvdemo import bench, quality
from kvdemo.bench import quality as quality_bench
from kvdemo.errors import UserFacingError
from kvdemo.prompts import ChunkLibrary

# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def test_kl_of_identical_distributions_is_zero_without_renormalising():
    ref = {1: math.log(0.5), 2: math.log(0.2), 3: math.log(0.1)}  # top-3 mass 0.8: not renormalised
    assert quality.topk_kl(ref, dict(ref)) == 0.0


def test_kl_uses_raw_logprobs_and_a_floor_for_missing_tokens():
    ref = {1: math.log(0.6), 2: math.log(0.3)}
    other = {1: math.log(0.5), 3: math.log(0.2), 4: math.log(0.1)}
    floor = math.log(0.1) - 1.0  # token 2 is missing: the other side's last log-prob minus 1
    want = 0.6 * (math.log(0.6) - math.log(0.5)) + 0.3 * (math.log(0.3) - floor)
    assert quality.topk_kl(ref, other) == pytest.approx(want)
    assert quality.topk_kl(ref, other) > quality.topk_kl(ref, {1: math.log(0.55), 2: math.log(0.3)})


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


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    values = [0.01 * i for i in range(40)]
    mean, lo, hi = quality.bootstrap_mean_ci(values, seed=3)
    assert lo < mean < hi and mean == pytest.approx(0.195)
    assert quality.bootstrap_mean_ci(values, seed=3) == (mean, lo, hi)
    assert quality.bootstrap_mean_ci([2.0]) == (2.0, 2.0, 2.0)
    narrow = quality.bootstrap_mean_ci([0.195] * 40)
    assert narrow[1] == narrow[2] == pytest.approx(0.195)


def test_summarize_has_the_result_keys():
    results = [quality.PromptResult(0.01 * i, {8: 0.001, 16: 0.002}, i % 33, i % 33 == 32) for i in range(40)]
    s = quality.summarize(results)
    assert {"first_token_kl", "first_token_kl_ci", "kl_at_8", "kl_at_16", "greedy32_agree", "mean_agree_prefix",
            "mean_agree_prefix_ci", "n_prompts"} <= set(s)
    assert s["greedy32_agree"] == pytest.approx(1 / 40)


# --------------------------------------------------------------------------------------------------
# The question set and prompt sampling
# --------------------------------------------------------------------------------------------------


def test_committed_question_set_names_real_chunks():
    library = ChunkLibrary.load(REPO_ROOT / "data")
    questions = quality.load_questions(quality_bench.QUESTIONS_FILE, list(library.chunks))
    assert len(questions) >= 40
    assert {q.chunk for q in questions} == set(library.chunks)  # every chunk is asked about
    for q in questions:
        assert q.question.strip().endswith("?") and q.answer.strip()


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


# --------------------------------------------------------------------------------------------------
# End to end against simulated engines
# --------------------------------------------------------------------------------------------------


def test_quality_bench_against_simulated_engines(tmp_path: Path):
    ports = free_ports(7)
    result = bench.run(["--quality", "--simulate", "--sim-speed", "50", "--max-model-len", "8192",
                        "--ratios", "0.15,1.0", "--baseline-fixes", "all,-mask", "--equivalence-ratios", "1.0",
                        "--prompts", "5", "--port", str(ports[0]),
                        "--engine-ports", ",".join(map(str, ports[1:])), "--out", str(tmp_path / "out"),
                        "--log-dir", str(tmp_path / "logs")])
    out = tmp_path / "out"
    written = json.loads((out / "quality-simulated.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert (out / "quality-simulated.png").stat().st_size > 10_000
    baseline = json.loads((out / "steps" / "quality-nomask-simulated.json").read_text())
    assert written["simulated"] is True and written["weights"] == "simulated"
    assert {"device", "versions", "model", "command", "n_prompts", "context_tokens", "control", "sweep",
            "fix_equivalence"} <= set(written)
    assert written["n_prompts"] == 5 and 4000 <= written["context_tokens"]["min"] <= 7000
    by_ratio = {r["recompute_ratio"]: r for r in written["sweep"]}
    assert set(by_ratio) == {0.15, 1.0} and [r["recompute_ratio"] for r in baseline["sweep"]] == [0.15, 1.0]
    for row in written["sweep"]:
        assert {"first_token_kl", "first_token_kl_ci", "kl_at_8", "kl_at_16", "kl_at_32", "greedy32_agree",
                "mean_agree_prefix", "mean_agree_prefix_ci", "blend_ttft_s", "full_ttft_s"} <= set(row)
    # the simulator drifts a blended answer by (1 - ratio): none at 1.0, some at 0.15; the control is exact
    assert written["control"]["first_token_kl"] == 0.0
    assert by_ratio[1.0]["first_token_kl"] == 0.0 and by_ratio[0.15]["first_token_kl"] > 0.0
    assert by_ratio[0.15]["mean_agree_prefix"] < by_ratio[1.0]["mean_agree_prefix"] == 32
    (eq,) = written["fix_equivalence"]
    assert eq["recompute_ratio"] == 1.0 and eq["fixes_minimal"] == "register,mistral,split,mask" and eq["passed"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--ratios", "0.15,abc"], "--ratios takes recompute ratios"),
    (["--ratios", "0,1.0"], "--ratios takes recompute ratios"),
    (["--equivalence-ratios", "2"], "--equivalence-ratios takes recompute ratios"),
    (["--equivalence-ratios", "0.25"], "must also be in --ratios"),
    (["--quality-context", "7000"], "--quality-context takes min,max"),
    (["--quality-context", "7000,4000"], "--quality-context takes min,max"),
    (["--prompts", "0"], "--prompts must be at least 1"),
])
def test_quality_bench_refuses_bad_flags_in_one_line(tmp_path: Path, flags: list[str], message: str):
    with pytest.raises(UserFacingError, match=message):
        bench.run(["--quality", "--simulate", "--out", str(tmp_path), *flags])


def test_simulated_quality_never_goes_to_benchmarks_results():
    with pytest.raises(UserFacingError, match="GPU measurements only"):
        bench.run(["--quality", "--simulate"])
