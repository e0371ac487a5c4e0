"""kvdemo.bench.spread: a blended repeat far above its context's median fails the GPU run loudly."""

from __future__ import annotations

import json

from kvdemo.bench import spread


def result(*contexts: tuple[int, list[float]]) -> dict:
    return {"cases": [{"context_target": ctx, "repeats": [
        {"blend_reordered_ttft_s": v, "blend_same_order_ttft_s": 0.1} for v in values]} for ctx, values in contexts]}


def test_a_repeat_over_the_bound_is_named():
    lines = spread.slow_repeats(result((16000, [0.176, 0.168, 0.217, 0.168, 0.159]), (24000, [0.24, 0.25, 0.25])))
    assert len(lines) == 1
    assert lines[0].startswith("16000 tokens, blend_reordered_ttft_s repeat 2: 0.217 s is 29% above the median 0.168")


def test_repeats_within_the_bound_pass_and_the_bound_is_exclusive():
    assert spread.slow_repeats(result((16000, [0.145, 0.144, 0.146, 0.146, 0.155]))) == []
    assert spread.slow_repeats(result((4000, [0.1, 0.1, 0.12]))) == []  # exactly 20 % over: not over the bound
    assert spread.slow_repeats(result((4000, [0.1, 0.1, 0.12])), bound=0.19)


def test_a_single_repeat_or_missing_values_are_not_judged():
    assert spread.slow_repeats(result((16000, [0.5]))) == []
    assert spread.slow_repeats({"cases": [{"context_target": 1, "repeats": [{}, {}]}]}) == []


def test_main_exit_status(tmp_path, capsys):
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    bad.write_text(json.dumps(result((16000, [0.1, 0.1, 0.3]))))
    good.write_text(json.dumps(result((16000, [0.1, 0.1, 0.11]))))
    assert spread.main([str(bad)]) == 1 and "SLOW REPEAT" in capsys.readouterr().out
    assert spread.main([str(good)]) == 0 and "within 20%" in capsys.readouterr().out
    assert spread.main([str(tmp_path / "missing.json")]) == 2
