"""Aggregation over prompts: per-variant rows, per-prompt values, paired differences against ``exact``, the
engine's committed numbers to read next to them, and the printed table."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from .. import quality as qm
from ..config import REPO_ROOT
from .evaluate import PromptOutcome
from .variants import Variant


def summarize(outcomes: Sequence[PromptOutcome], variants: Sequence[Variant],
              boot: qm.Bootstrap | None = None) -> list[dict]:
    """Per variant: kvdemo.quality.summarize over prompts, plus the selection statistics and its cost: tokens
    recomputed from the check layer on (count, fraction of the blended tokens) and the token-layers computed
    over a full prefill's (core.recompute_layer_fraction)."""
    import statistics

    rows = []
    for v in variants:
        row = {"variant": v.key, "recompute_ratio": v.ratio, "mask": v.mask, "selection": v.selection,
               "gaps": v.gaps, "check_layer": v.check,
               **qm.summarize([o.results[v.key] for o in outcomes], boot),
               "mean_recomputed_tokens": statistics.fmean(o.selected[v.key] for o in outcomes),
               "mean_recomputed_fraction": statistics.fmean(o.selected[v.key] / o.blend_len
                                                            for o in outcomes),
               "mean_recompute_layer_fraction": statistics.fmean(o.layer_fraction[v.key] for o in outcomes),
               "gaps_in_selection": statistics.fmean(o.gaps_selected[v.key] for o in outcomes)}
        overlaps = [o.oracle_overlap[v.key] for o in outcomes if v.key in o.oracle_overlap]
        if overlaps:
            row["overlap_with_lmcache_selection"] = statistics.fmean(overlaps)
        rows.append(row)
    return rows


def per_prompt(outcomes: Sequence[PromptOutcome], variants: Sequence[Variant]) -> dict[str, list[dict]]:
    """``{variant: [every column of kvdemo.quality.PromptResult, one dict per prompt]}`` in prompt order."""
    return {v.key: [o.results[v.key].as_json() for o in outcomes] for v in variants}


def paired_differences(prompt_rows: Sequence[dict], variants: Sequence[Variant],
                       boot: qm.Bootstrap | None = None) -> list[dict]:
    """Per variant: its first-token KL and identical prefix minus ``exact``'s at the same ratio, paired over
    prompts (mean and bootstrap interval), and the mean difference in recomputed tokens where rows carry
    them."""
    boot = boot or qm.Bootstrap()
    out = []
    for v in variants:
        base = f"r{v.ratio:g}/exact"
        if v.key == base:
            continue
        rows = [row for row in prompt_rows if v.key in row["first_token_kl"] and base in row["first_token_kl"]]
        if not rows:
            continue
        entry = {"variant": v.key, "minus": base, "n_prompts": len(rows)}
        for metric, name in (("first_token_kl", "first_token_kl_diff"), ("agree_prefix", "mean_agree_prefix_diff")):
            if all(metric in row for row in rows):
                d = boot.diff([row[metric][v.key] for row in rows], [row[metric][base] for row in rows])
                entry.update({name: d["mean"], f"{name}_ci": d["ci"]})
        if all("recomputed_tokens" in row for row in rows):
            entry["mean_recomputed_tokens_diff"] = sum(
                row["recomputed_tokens"][v.key] - row["recomputed_tokens"][base] for row in rows) / len(rows)
        out.append(entry)
    return out


def engine_numbers() -> dict[str, Any]:
    """The engine's committed quality sweeps (40 prompts, bf16, H200), for reading next to these numbers."""
    out: dict[str, Any] = {}
    for name, path in (("exact_mask", REPO_ROOT / "benchmarks/results/quality-h200.json"),
                       ("lmcache_mask", REPO_ROOT / "benchmarks/results/steps/quality-nomask-h200.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        coarse = any("first_token_kl_partial_topk" in r for r in data.get("sweep", []))
        out[name] = {"file": str(path.relative_to(REPO_ROOT)), "device": data.get("device"),
                     "kvdemo_commit": data.get("kvdemo_commit"),
                     "first_token_kl": "coarsened (top-k + rest)" if coarse else "partial top-k sum (older file)",
                     "n_prompts": data.get("n_prompts"), "control_kl": data.get("control", {}).get("first_token_kl"),
                     "sweep": [{k: r.get(k) for k in ("recompute_ratio", "first_token_kl", "first_token_kl_ci",
                                                      "mean_agree_prefix")} for r in data.get("sweep", [])]}
    return out


def print_table(result: dict, log: Callable[[str], None] = print) -> None:
    log(f"  {result['n_prompts']} prompts, {result['device']}, {result['dtype']}; self-check {result['self_check']}")
    for r in result["variants"]:
        lo, hi = r["first_token_kl_ci"]
        log(f"  {r['variant']:<18} KL {r['first_token_kl']:.4f} [{lo:.4f}, {hi:.4f}]  prefix "
            f"{r['mean_agree_prefix']:.1f}/{result['answer_tokens']}  recomputed {r['mean_recomputed_tokens']:.0f}")
    for d in result.get("paired_vs_exact", []):
        lo, hi = d["first_token_kl_diff_ci"]
        cost = d.get("mean_recomputed_tokens_diff")
        extra = f"  recomputed {cost:+.0f}" if cost is not None else ""
        log(f"  {d['variant']:<18} minus {d['minus']}: KL {d['first_token_kl_diff']:+.4f} [{lo:+.4f}, "
            f"{hi:+.4f}]{extra}")
