"""The default recompute ratio, chosen by evidence: ``python -m kvdemo.bench.choose_ratio QUALITY.json``.

The rule: the lowest swept ratio whose answers are as good as full prefill — the paired 95 % interval of its
F1 difference to 🐢's full prefill includes 0 or lies above ``-f1_bar`` (CacheBlend's bar, 0.02) — at every
context size named (default 16K and 30K), and whose first-token KL is not above the reference ratio's
(0.15, today's default) interval there. It prints each ratio's verdict per context and the decision; a ratio
below the reference still needs its speed measured before it becomes the default (blend.yaml)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REFERENCE_RATIO = 0.15
F1_BAR = 0.02
CONTEXTS = ("16000", "30000")


@dataclass(frozen=True)
class Verdict:
    ratio: float
    context: str
    f1_ok: bool
    kl_ok: bool
    why: str


def verdicts(result: dict, contexts: tuple[str, ...] = CONTEXTS, reference: float = REFERENCE_RATIO,
             f1_bar: float = F1_BAR) -> list[Verdict]:
    """One verdict per swept ratio and context (the default sweep of a quality result); ValueError naming what
    is missing when a context or the reference ratio was not swept."""
    rows = {(r["context"], float(r["recompute_ratio"])): r for r in result.get("sweep", [])}
    out = []
    for ctx in contexts:
        ref = rows.get((ctx, reference))
        if ref is None:
            swept = sorted({c for c, _ in rows})
            raise ValueError(f"no row for ratio {reference:g} at context {ctx} (contexts swept: {swept})")
        kl_hi = ref["first_token_kl_ci"][1]
        for (c, ratio), row in sorted(rows.items()):
            if c != ctx:
                continue
            lo, hi = row["f1_diff_ci"]
            f1_ok = lo <= 0 <= hi or lo >= -f1_bar
            kl_ok = row["first_token_kl"] <= kl_hi
            why = (f"F1 {row['f1']:.3f}, minus full prefill {row['f1_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                   f"{'ok' if f1_ok else 'below'}; KL {row['first_token_kl']:.4f} vs {reference:g}'s upper "
                   f"{kl_hi:.4f} {'ok' if kl_ok else 'above'}")
            out.append(Verdict(ratio, ctx, f1_ok, kl_ok, why))
    return out


def choose(found: list[Verdict], contexts: tuple[str, ...] = CONTEXTS) -> float | None:
    """The lowest ratio that passes both tests at every context, or None."""
    ratios = sorted({v.ratio for v in found})
    passing = [r for r in ratios
               if all(any(v.ratio == r and v.context == c and v.f1_ok and v.kl_ok for v in found) for c in contexts)]
    return passing[0] if passing else None


def decision(chosen: float | None, reference: float = REFERENCE_RATIO) -> str:
    if chosen is None:
        return f"no swept ratio passes at every context: keep {reference:g}"
    if chosen < reference:
        return (f"{chosen:g} passes: measure its speed on the 7B shape (16K/24K, A/B with {reference:g} on one "
                f"machine) before it becomes blend.yaml's default")
    if chosen == reference:
        return f"{reference:g} is the lowest ratio that passes: keep it"
    return f"{reference:g} does not pass, {chosen:g} is the lowest that does: raise the default to it"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvdemo.bench.choose_ratio", description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path, help="a quality result JSON of python -m kvdemo.bench --quality")
    p.add_argument("--contexts", default=",".join(CONTEXTS), help="context labels that must all pass")
    p.add_argument("--reference", type=float, default=REFERENCE_RATIO, help="today's default ratio")
    p.add_argument("--f1-bar", type=float, default=F1_BAR, help="an F1 loss this small still passes")
    a = p.parse_args(argv)
    contexts = tuple(c.strip() for c in a.contexts.split(",") if c.strip())
    try:
        found = verdicts(json.loads(a.result.read_text()), contexts, a.reference, a.f1_bar)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"kvdemo.bench.choose_ratio: {a.result}: {exc}", file=sys.stderr)
        return 2
    for v in found:
        print(f"  {v.context:>6} ratio {v.ratio:<5g} {'PASS' if v.f1_ok and v.kl_ok else 'fail'}  {v.why}")
    print(f"kvdemo.bench.choose_ratio: {decision(choose(found, contexts), a.reference)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
