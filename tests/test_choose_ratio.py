"""kvdemo.bench.choose_ratio: the default recompute ratio from a quality result's paired intervals."""

from __future__ import annotations

import json

import pytest

from kvdemo.bench import choose_ratio as cr


def _row(ctx: str, ratio: float, f1_ci: tuple[float, float], kl: float, kl_hi: float | None = None) -> dict:
    return {"context": ctx, "recompute_ratio": ratio, "f1": 0.5, "f1_diff": sum(f1_ci) / 2, "f1_diff_ci": list(f1_ci),
            "first_token_kl": kl, "first_token_kl_ci": [kl * 0.8, kl_hi if kl_hi is not None else kl * 1.2]}


def _result(**rows_by_ratio) -> dict:
    sweep = []
    for ctx in ("8000", "16000", "30000"):
        for ratio, (f1_ci, kl) in rows_by_ratio[f"c{ctx}"].items():
            sweep.append(_row(ctx, ratio, f1_ci, kl))
    return {"sweep": sweep}


GOOD, LOSS, SMALL_LOSS = (-0.03, 0.02), (-0.08, -0.03), (-0.015, -0.005)


def test_the_lowest_ratio_passing_at_every_context_is_chosen():
    result = _result(c8000={0.02: (LOSS, 0.5)},  # 8K is not among the contexts that must pass
                     c16000={0.02: (LOSS, 0.05), 0.05: (GOOD, 0.03), 0.15: (GOOD, 0.03), 1.0: (GOOD, 0.001)},
                     c30000={0.02: (GOOD, 0.04), 0.05: (SMALL_LOSS, 0.03), 0.15: (GOOD, 0.03), 1.0: (GOOD, 0.001)})
    found = cr.verdicts(result)
    assert cr.choose(found) == 0.05  # 0.02 loses F1 at 16K; 0.05's small loss at 30K is within the bar
    assert "measure its speed" in cr.decision(0.05)


def test_kl_above_the_reference_interval_fails_a_ratio():
    result = _result(c8000={}, c16000={0.05: (GOOD, 0.09), 0.15: (GOOD, 0.03)},
                     c30000={0.05: (GOOD, 0.03), 0.15: (GOOD, 0.03)})
    assert cr.choose(cr.verdicts(result)) == 0.15  # 0.05's KL at 16K is above 0.15's upper bound (0.036)
    assert cr.decision(0.15) == "0.15 is the lowest ratio that passes: keep it"


def test_nothing_passes_and_missing_rows_are_one_line():
    result = _result(c8000={}, c16000={0.15: (LOSS, 0.03)}, c30000={0.15: (GOOD, 0.03)})
    assert cr.choose(cr.verdicts(result)) is None and "keep 0.15" in cr.decision(None)
    with pytest.raises(ValueError, match="no row for ratio 0.15 at context 30000"):
        cr.verdicts({"sweep": [_row("16000", 0.15, GOOD, 0.03)]})


def test_cli_prints_verdicts_and_decision(tmp_path, capsys):
    path = tmp_path / "q.json"
    path.write_text(json.dumps(_result(c8000={}, c16000={0.05: (GOOD, 0.03), 0.15: (GOOD, 0.03)},
                                       c30000={0.05: (GOOD, 0.03), 0.15: (GOOD, 0.03)})))
    assert cr.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 4 and "choose_ratio: 0.05 passes" in out
    assert cr.main([str(tmp_path / "missing.json")]) == 2
