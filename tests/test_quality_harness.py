"""The quality harness's parts without engines: the control's request construction, the evidence it reads from
the plugin's log lines and telemetry records, and the paired comparisons of quality_report."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from kvdemo import quality
from kvdemo.bench import quality as qb
from kvdemo.bench import quality_report as report
from kvdemo.lmcache_patches import hooks, telemetry

# --------------------------------------------------------------------------------------------------
# The reference (cold) and the control (prefix hit)
# --------------------------------------------------------------------------------------------------


class FakeScorer:
    """Records what the harness asks of an engine."""

    def __init__(self) -> None:
        self.calls: list = []

    async def reset_prefix_cache(self) -> None:
        self.calls.append("reset")

    async def reply(self, ids: list[int], max_tokens: int, request_id: str) -> qb.Reply:
        self.calls.append((len(ids), max_tokens, request_id))
        return qb.Reply(list(range(100, 100 + max_tokens)), {100: -0.1}, 0)


def test_reference_requests_are_cold_and_the_control_reuses_them():
    ids = list(range(50))
    scorer = FakeScorer()
    ref = asyncio.run(qb.answer(scorer, ids, None, "plain-p0-ref", 40, cold=True))
    assert scorer.calls[::2] == ["reset"] * (1 + len(quality.APPENDED))  # a reset before every request
    sent = scorer.calls[1::2]
    assert [(n, m) for n, m, _ in sent] == [(50, 40)] + [(50 + k, 1) for k in quality.APPENDED]
    assert all(rid.startswith(qb.REQUEST_TAG + "plain-p0-ref-") for _, _, rid in sent)
    assert ref.scored.tokens == list(range(100, 140)) and set(ref.at) == set(quality.APPENDED)
    control = FakeScorer()
    asyncio.run(qb.answer(control, ids, ref.scored.tokens, "plain-p0-control", 40))
    assert "reset" not in control.calls  # the same requests again, straight after: prefix hits
    assert [(n, m) for n, m, _ in control.calls] == [(n, m) for n, m, _ in sent]


class _Handle:
    def __init__(self, key: str) -> None:
        self.spec = type("Spec", (), {"key": key, "url": f"http://{key}", "label": key, "lmcache": key != "plain"})()


def _fake_answers(monkeypatch, log: list, fail_at: int | None = None) -> None:
    """qb.answer replaced: logs (engine, tag) at start and end, the plain engine slower than the others."""
    async def fake_answer(scorer, ids, reference_tokens, tag, max_tokens, cold=False):
        engine = scorer.handle.spec.key
        log.append(("start", engine, tag))
        await asyncio.sleep(0.01 if engine == "plain" else 0.001)
        if engine == "plain" and fail_at is not None and tag == f"plain-p{fail_at}-ref":
            raise qb.EngineError("🐢 plain vLLM: POST /v1/completions answered HTTP 500", "plain")
        log.append(("end", engine, tag))
        return qb.Answer(quality.Scored([7, 8], {7: -0.1}), {}, [0])
    monkeypatch.setattr(qb, "answer", fake_answer)


def test_blended_requests_start_as_soon_as_their_reference_is_in(monkeypatch):
    log: list = []
    _fake_answers(monkeypatch, log)
    prompts = [[1, 2, 3]] * 4
    refs, controls, answers = asyncio.run(qb.measure_all(_Handle("plain"), [_Handle("r0.15"), _Handle("r1")],
                                                         prompts, 16))
    assert len(refs) == len(controls) == 4 and [len(a) for a in answers] == [4, 4]
    for engine in ("r0.15", "r1"):
        for i in range(4):
            started = log.index(("start", engine, f"{engine}-p{i}"))
            assert log.index(("end", "plain", f"plain-p{i}-ref")) < started  # after its own reference
    # ... and without waiting for the whole reference pass: the passes overlap
    assert log.index(("start", "r1", "r1-p0")) < log.index(("end", "plain", "plain-p3-ref"))


def test_a_failed_reference_pass_stops_the_run_with_its_error(monkeypatch):
    log: list = []
    _fake_answers(monkeypatch, log, fail_at=2)
    with pytest.raises(qb.EngineError, match="HTTP 500"):
        asyncio.run(qb.measure_all(_Handle("plain"), [_Handle("r0.15")], [[1, 2, 3]] * 4, 16))
    assert ("start", "r0.15", "r0.15-p2") not in log  # nothing blended without its reference


def test_cold_check_counts_requests_that_were_not_cold():
    cached = {report.FULL: [[0, 0], [0, 16]], report.CONTROL: [[48, 48], [0, 64]]}
    assert report.cold_check(cached) == {"reference_requests": 4, "reference_requests_with_cached_tokens": 1,
                                         "control_requests": 4, "control_requests_without_cached_tokens": 1}


# --------------------------------------------------------------------------------------------------
# Evidence
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def plugin_line(monkeypatch):
    """Formats a record exactly as the plugin's own log handler does in an engine process."""
    level = hooks.logger.level
    hooks.reset()
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # an engine process: no root handler
    hooks.ensure_log_handler()
    handler = hooks.state.handler
    assert handler is not None

    def line(levelno: int, msg: str) -> str:
        return handler.format(logging.LogRecord(hooks.logger.name, levelno, __file__, 1, msg, (), None))

    yield line
    hooks.reset()
    hooks.logger.setLevel(level)


def test_evidence_matcher_reads_the_plugins_real_log_format(plugin_line):
    warn = plugin_line(logging.WARNING, "kvdemo plugin: mask: exact attention failed (RuntimeError: x); "
                                        "LMCache's FlashAttention call is used")
    info = plugin_line(logging.INFO, "kvdemo plugin: mask: exact causal attention for 824 recomputed of 5497 tokens")
    assert "[kvdemo]" in warn and not warn.startswith("WARNING kvdemo")  # the format the old matcher missed
    lines = ["(EngineCore pid=3042) " + warn, "(EngineCore pid=3042) " + info, warn,
             "(EngineCore pid=3042) \x1b[33mWARNING 12-05 10:00:00 [scheduler.py:77] not ours\x1b[0m",
             "(EngineCore pid=3042) [2026-12-05 10:00:00,000] LMCache WARNING: Double unpin occurred",
             "2026-12-05 10:00:00,000 ERROR kvdemo.vllm_plugin: kvdemo plugin: fix 'x' failed",
             "INFO 12-05 10:00:00 [kvdemo] kvdemo telemetry: [req_id=kvq-r1] ... WARNING words later"]
    found = qb.kvdemo_warnings(lines)
    assert found == [lines[0], lines[2], lines[5]]


def test_telemetry_counts_the_measured_requests_mask_use(tmp_path):
    base = {"path": "blend", "prompt_tokens": 5000, "lmcache_hit_tokens": 4900}
    records = [{"req_id": "cmpl-kvq-r0.15-p0-answer-ab12cd34-0-x", "exact_mask_layers": 29, "mask_fallback_layers": 0},
               {"req_id": "cmpl-kvq-r0.15-p0-at8-ab12cd35-0-x", "exact_mask_layers": 0, "mask_fallback_layers": 29},
               {"req_id": "cmpl-kvq-r0.15-p1-answer-ab12cd36-0-x", "exact_mask_layers": 12, "mask_fallback_layers": 17},
               {"req_id": "cmpl-kvq-r0.15-p1-at8-ab12cd37-0-x", "path": "retrieve"},  # an older record: no counts
               {"req_id": "cmpl-kvdemo-warmup-0-x", "exact_mask_layers": 29, "mask_fallback_layers": 0}]
    for r in records:
        telemetry.write_record(tmp_path, {**base, **r})
    with telemetry.record_path(tmp_path, pid=1).open("a") as f:
        f.write("{half a line\n")
    assert qb.telemetry_counts(tmp_path) == {"recorded": 4, "blended": 3, "exact_mask": 2, "mask_fallback": 2,
                                             "without_mask_counts": 1}
    assert qb.telemetry_counts(tmp_path / "none")["recorded"] == 0
    assert qb.telemetry_counts(None)["recorded"] == 0


def test_stop_tokens_are_the_tokenizers_end_of_turn_ids():
    class Tok:
        eos_token_id = 2

        def get_vocab(self):
            return {"<|im_end|>": 7, "hello": 9, "</s>": 2}

    assert qb.stop_token_ids(Tok()) == {2, 7}


# --------------------------------------------------------------------------------------------------
# Paired comparisons
# --------------------------------------------------------------------------------------------------


def _results(kls: list[float], f1: float = 0.5) -> list[quality.PromptResult]:
    return [quality.PromptResult(k, k, {8: k}, 10, False, f1=f1, cited=True) for k in kls]


def _setup(shift: float, n: int = 40):
    rng = random.Random(2)
    hardness = [rng.uniform(0.0, 0.05) for _ in range(n)]
    ctx = report.Context("4000-7000", None, (4000, 7000), 0, tuple([5000] * n))
    variants = [report.Variant("r0.15", 0.15, "all", "default"), report.Variant("r0.15-baseline", 0.15, "all,-mask",
                                                                                "baseline"),
                report.Variant("r0.15-minimal", 0.15, qb.MINIMAL_FIXES, "minimal")]
    results = {report.CONTROL: _results([0.003 + rng.gauss(0, 0.0005) for _ in hardness]),
               "r0.15": _results([h + 0.02 for h in hardness]),
               "r0.15-baseline": _results([h + 0.03 for h in hardness], f1=0.4),
               "r0.15-minimal": _results([h + 0.02 + shift + rng.gauss(0, 0.0003) for h in hardness])}
    full = [report.AnswerScore("text", 0.6, True)] * n
    return ctx, variants, results, full


def test_fix_equivalence_fails_when_a_speed_fix_moves_quality():
    boot = quality.Bootstrap(draws=500)
    ctx, variants, results, _ = _setup(shift=0.0)
    (same,) = report.fix_equivalence([ctx], variants, results, boot, 0.003, ["kernels"])
    assert same["passed"] and abs(same["first_token_kl_diff"]) < 0.001
    ctx, variants, results, _ = _setup(shift=-0.009)  # all fixes 0.009 nats worse than the minimal set
    (moved,) = report.fix_equivalence([ctx], variants, results, boot, 0.003, ["kernels"])
    assert not moved["passed"] and moved["first_token_kl_diff"] == pytest.approx(-0.009, abs=0.001)
    assert moved["bound_nats"] == 0.003 and moved["speed_fixes_compared"] == ["kernels"]


def test_sweep_rows_and_mask_comparison_are_paired():
    boot = quality.Bootstrap(draws=500)
    ctx, variants, results, full = _setup(shift=0.0)
    (row,) = report.sweep_rows("default", [ctx], variants, results, full, {"4000-7000": {"r0.15": 0.1}}, boot)
    lo, hi = row["first_token_kl_minus_control_ci"]
    assert 0 < lo < row["first_token_kl_minus_control"] < hi
    assert row["f1_diff"] == pytest.approx(-0.1) and row["f1_diff_ci"] == [pytest.approx(-0.1)] * 2
    assert row["cite_acc_diff"] == 0.0 and row["blend_ttft_s"] == 0.1 and row["full_ttft_s"] is None
    (mask,) = report.mask_comparison([ctx], variants, results, boot)
    assert mask["first_token_kl_diff"] == pytest.approx(0.01) and mask["first_token_kl_diff_ci"][0] > 0.009
    assert mask["baseline_fixes"] == "all,-mask" and mask["f1_diff"] == pytest.approx(-0.1)
    pp = report.per_prompt(results, {k: full for k in ("full", "control", "r0.15")},
                           {k: [[0]] * 40 for k in ("full", "control", "r0.15")}, ["full", "r0.15"])
    assert set(pp) == {"full", "r0.15"} and pp["full"][0] == {"f1": 0.6, "cited": True, "answer": "text",
                                                             "cached_tokens": [0]}
    assert pp["r0.15"][0]["first_token_kl"] == results["r0.15"][0].first_token_kl
