"""The quality case's numbers from its per-prompt results: sweep rows, paired comparisons, the table, the plot.

No engines here: kvdemo.bench.quality measures, this module turns per-prompt values (kvdemo.quality) into the
JSON's summaries. Every difference the README states is a paired bootstrap interval over prompts:

- each sweep row against the control (``first_token_kl_minus_control``) and against the full prefill's answer
  (``f1_diff``, ``cite_acc_diff``);
- LMCache's mask against the exact mask per ratio (``mask_comparison``: baseline minus fixed);
- fix equivalence (``fix_equivalence``): (minimal fixes vs reference) − (all fixes vs reference), passed when
  its whole interval lies within ± ``bound_nats``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import quality as qm


@dataclass(frozen=True)
class Variant:
    """One 🚀 engine of the sweep: its recompute ratio and the plugin fixes it runs with."""

    key: str
    ratio: float
    fixes: str
    group: str  # "default", "baseline" or "minimal"


@dataclass(frozen=True)
class Context:
    """One context size of the run: its prompt bounds and where its prompts sit in the run's prompt list."""

    label: str  # "4000-7000" (a --quality-context band) or "8000" (a --quality-contexts target)
    target: int | None
    band: tuple[int, int]
    start: int
    tokens: tuple[int, ...]  # each prompt's length

    @property
    def indices(self) -> range:
        return range(self.start, self.start + len(self.tokens))

    def pick(self, items: Sequence):
        return [items[i] for i in self.indices]


@dataclass(frozen=True)
class AnswerScore:
    """One answer's text and its scores against the question set."""

    text: str
    f1: float
    cited: bool


FULL = "full"  # per_prompt key of the reference (🐢 full prefill, cold)
CONTROL = "control"  # per_prompt key of the control (🐢 again, prefix hit)


def token_stats(tokens: Sequence[int]) -> dict:
    return {"min": min(tokens), "median": statistics.median(tokens), "max": max(tokens)}


def _diff(boot: qm.Bootstrap, name: str, a: Sequence[float], b: Sequence[float]) -> dict:
    d = boot.diff(a, b)
    return {name: d["mean"], f"{name}_ci": d["ci"]}


PAIRED_METRICS = (("first_token_kl", "first_token_kl_diff"), ("agree_prefix", "mean_agree_prefix_diff"),
                  ("f1", "f1_diff"))  # (per-prompt metric, name of its paired difference) in comparisons


def paired_diffs(boot: qm.Bootstrap, a: Sequence[qm.PromptResult], b: Sequence[qm.PromptResult]) -> dict:
    """Each of PAIRED_METRICS as a − b over the same prompts, with its bootstrap interval."""
    out: dict = {}
    for metric, name in PAIRED_METRICS:
        out.update(_diff(boot, name, qm.values(a, metric), qm.values(b, metric)))
    return out


def context_summary(ctx: Context, results: dict[str, list[qm.PromptResult]], full: list[AnswerScore],
                    boot: qm.Bootstrap) -> dict:
    """One entry of the JSON's ``contexts``: its bounds, token counts, control and full-prefill answer scores."""
    f = ctx.pick(full)
    scores = qm.answer_summary([s.f1 for s in f], [s.cited for s in f], boot)
    return {"label": ctx.label, "target": ctx.target, "band": list(ctx.band), "n_prompts": len(ctx.tokens),
            "context_tokens": token_stats(ctx.tokens), "control": qm.summarize(ctx.pick(results[CONTROL]), boot),
            "f1_full": scores["f1"], "f1_full_ci": scores["f1_ci"], "cite_acc_full": scores["cite_acc"],
            "cite_acc_full_ci": scores["cite_acc_ci"]}


def sweep_rows(group: str, contexts: Sequence[Context], variants: Sequence[Variant],
               results: dict[str, list[qm.PromptResult]], full: list[AnswerScore],
               ttft: dict[str, dict[str, float]], boot: qm.Bootstrap) -> list[dict]:
    """Per context and ratio of ``group``: the summary, and paired differences against the control (KL) and
    against the full prefill's answer (F1, citation)."""
    rows = []
    for ctx in contexts:
        control = ctx.pick(results[CONTROL])
        f = ctx.pick(full)
        for v in variants:
            if v.group != group:
                continue
            mine = ctx.pick(results[v.key])
            row = {"context": ctx.label, "recompute_ratio": v.ratio, "fixes": v.fixes, **qm.summarize(mine, boot)}
            row.update(_diff(boot, "first_token_kl_minus_control", qm.values(mine, "first_token_kl"),
                             qm.values(control, "first_token_kl")))
            row.update(_diff(boot, "f1_diff", qm.values(mine, "f1"), [s.f1 for s in f]))
            row.update(_diff(boot, "cite_acc_diff", qm.values(mine, "cited"), [float(s.cited) for s in f]))
            row.update({"blend_ttft_s": ttft.get(ctx.label, {}).get(v.key),
                        "full_ttft_s": ttft.get(ctx.label, {}).get("plain")})
            rows.append(row)
    return rows


def mask_comparison(contexts: Sequence[Context], variants: Sequence[Variant],
                    results: dict[str, list[qm.PromptResult]], boot: qm.Bootstrap) -> list[dict]:
    """Per context and ratio swept with both: the baseline fixes (LMCache's mask) minus the default (exact
    mask), each against the reference, paired over prompts."""
    rows = []
    for ctx in contexts:
        for base in (v for v in variants if v.group == "baseline"):
            fixed = next(v for v in variants if v.group == "default" and v.ratio == base.ratio)
            a, b = ctx.pick(results[base.key]), ctx.pick(results[fixed.key])
            row = {"context": ctx.label, "recompute_ratio": base.ratio, "fixes": fixed.fixes,
                   "baseline_fixes": base.fixes, "what": "baseline minus fixes, paired over prompts"}
            row.update(paired_diffs(boot, a, b))
            rows.append(row)
    return rows


def fix_equivalence(contexts: Sequence[Context], variants: Sequence[Variant],
                    results: dict[str, list[qm.PromptResult]], boot: qm.Bootstrap, bound_nats: float,
                    speed_fixes: Sequence[str]) -> list[dict]:
    """Per context and equivalence ratio: (minimal fixes vs reference) − (all fixes vs reference), paired over
    prompts; ``passed`` when the KL difference's interval lies within ± ``bound_nats``."""
    rows = []
    for ctx in contexts:
        for m in (v for v in variants if v.group == "minimal"):
            d = next(v for v in variants if v.group == "default" and v.ratio == m.ratio)
            a, b = ctx.pick(results[m.key]), ctx.pick(results[d.key])
            row = {"context": ctx.label, "recompute_ratio": m.ratio, "fixes_minimal": m.fixes,
                   "fixes_default": d.fixes, "speed_fixes_compared": list(speed_fixes), "n_prompts": len(a),
                   "first_token_kl_minimal": statistics.fmean(qm.values(a, "first_token_kl")),
                   "first_token_kl_default": statistics.fmean(qm.values(b, "first_token_kl"))}
            row.update(paired_diffs(boot, a, b))
            lo, hi = row["first_token_kl_diff_ci"]
            row.update({"bound_nats": bound_nats, "passed": max(abs(lo), abs(hi)) <= bound_nats})
            rows.append(row)
    return rows


def per_prompt(results: dict[str, list[qm.PromptResult]], answers: dict[str, list[AnswerScore]],
               cached: dict[str, list[list[int]]], keys: Sequence[str]) -> dict[str, list[dict]]:
    """``{variant: [one dict per prompt]}``, in the order of the JSON's ``prompts``: every column, the answer
    text and the cached prompt tokens each request reported (the answer, then each appended request)."""
    out = {}
    for key in keys:
        rows = []
        for i, score in enumerate(answers[key]):
            row = results[key][i].as_json() if key in results else {"f1": score.f1, "cited": score.cited}
            rows.append({**row, "answer": score.text, "cached_tokens": cached[key][i]})
        out[key] = rows
    return out


def cold_check(cached: dict[str, list[list[int]]]) -> dict:
    """How many reference requests found cached prompt tokens (should be none) and control requests found
    none (should be none either: each is a prefix hit)."""
    ref = [n for per in cached[FULL] for n in per]
    ctl = [n for per in cached[CONTROL] for n in per]
    return {"reference_requests": len(ref), "reference_requests_with_cached_tokens": sum(1 for n in ref if n),
            "control_requests": len(ctl), "control_requests_without_cached_tokens": sum(1 for n in ctl if not n)}


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def print_table(result: dict) -> None:
    if result.get("simulated"):
        print("  SIMULATED engines: these numbers only show that the harness runs")
    for c in result["contexts"]:
        k = c["control"]
        print(f"  context {c['label']} ({c['n_prompts']} prompts): control (🐢 cold vs prefix hit) KL "
              f"{k['first_token_kl']:.4f}, identical prefix {k['mean_agree_prefix']:.1f}/{result['answer_tokens']}, "
              f"identical {k['greedy32_agree']:.0%}; full prefill F1 {c['f1_full']:.3f}, cite {c['cite_acc_full']:.0%}")
    for label, rows in (("fixed", result["sweep"]), ("baseline", result.get("baseline_sweep", []))):
        for r in rows:
            lo, hi = r["first_token_kl_minus_control_ci"]
            print(f"  {label} {r['context']} ratio {r['recompute_ratio']:<5g} KL {r['first_token_kl']:.4f} "
                  f"(−control [{lo:+.4f}, {hi:+.4f}])  prefix {r['mean_agree_prefix']:.1f}  identical "
                  f"{r['greedy32_agree']:.0%}  F1 {r['f1']:.3f} ({r['f1_diff']:+.3f})  TTFT {r['blend_ttft_s']}")
    for m in result.get("mask_comparison", []):
        lo, hi = m["first_token_kl_diff_ci"]
        print(f"  {m['context']} ratio {m['recompute_ratio']:g}: {m['baseline_fixes']} minus {m['fixes']}: KL "
              f"{m['first_token_kl_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    for e in result["fix_equivalence"]:
        lo, hi = e["first_token_kl_diff_ci"]
        print(f"  equivalence {e['context']} ratio {e['recompute_ratio']:g}: KL minimal − all "
              f"{e['first_token_kl_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] within ±{e['bound_nats']:g} → "
              f"{'passed' if e['passed'] else 'FAILED'}")
    check = result["cold_check"]
    if check["reference_requests_with_cached_tokens"]:
        print(f"  WARNING: {check['reference_requests_with_cached_tokens']} of {check['reference_requests']} "
              "reference requests were not cold (cached prompt tokens reported)")


def plot_quality(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_pf) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ("-", "--", ":", "-.")
    groups = [("with the mask fix" if result.get("baseline_sweep") else "default fixes", result["sweep"], "C0")]
    if result.get("baseline_sweep"):
        groups.append((f"fixes {result['baseline']['fixes']}", result["baseline_sweep"], "C3"))
    many = len(result["contexts"]) > 1
    for n, ctx in enumerate(result["contexts"]):
        for label, all_rows, color in groups:
            rows = [r for r in all_rows if r["context"] == ctx["label"]]
            if not rows:
                continue
            x = [r["recompute_ratio"] for r in rows]
            name = f"{label}, {ctx['label']}" if many else label
            for ax, key in ((ax_kl, "first_token_kl"), (ax_pf, "mean_agree_prefix")):
                ax.errorbar(x, [r[key] for r in rows], color=color, linestyle=styles[n % len(styles)], marker="o",
                            capsize=3, label=name, yerr=[[r[key] - r[f"{key}_ci"][0] for r in rows],
                                                         [r[f"{key}_ci"][1] - r[key] for r in rows]])
    c = result["control"]
    ax_kl.axhspan(*c["first_token_kl_ci"], color="grey", alpha=0.25, label="control: cold vs prefix hit (95 % CI)")
    ax_pf.axhspan(*c["mean_agree_prefix_ci"], color="grey", alpha=0.25,
                  label="control: cold vs prefix hit (95 % CI)")
    for ax in (ax_kl, ax_pf):
        ax.set_xscale("log")
        ax.set_xlabel("blend_recompute_ratios")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax_kl.set_ylabel("first-token KL vs full prefill (nats, top-k + rest)")
    ax_pf.set_ylabel(f"identical greedy prefix (of {result['answer_tokens']})")
    sim = "SIMULATED — " if result.get("simulated") else ""
    fig.suptitle(f"{sim}Blended vs full prefill, {result['n_prompts']} prompts, {Path(result['model']).name} "
                 f"({result['weights']} weights), {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
