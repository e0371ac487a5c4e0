"""Blended repeats that stray from their own median: ``python -m kvdemo.bench.spread RESULT.json``.

A repeat more than ``--bound`` (default 20 %) slower than the median of its context's repeats is printed
and the exit status is 1, so a GPU run fails loudly instead of hiding a bimodal path behind a median."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

SPREAD_KEYS = ("blend_same_order_ttft_s", "blend_reordered_ttft_s")


def slow_repeats(result: dict, bound: float = 0.2, keys: tuple[str, ...] = SPREAD_KEYS) -> list[str]:
    """One line per repeat whose TTFT exceeds (1 + bound) × the median of its context's repeats."""
    lines = []
    for case in result.get("cases", []):
        for key in keys:
            values = [r[key] for r in case.get("repeats", []) if r.get(key) is not None]
            if len(values) < 2:
                continue
            median = statistics.median(values)
            for i, value in enumerate(values):
                if value > (1 + bound) * median:
                    lines.append(f"{case.get('context_target')} tokens, {key} repeat {i}: {value:.3f} s is "
                                 f"{value / median - 1:.0%} above the median {median:.3f} s of "
                                 f"{len(values)} repeats (bound {bound:.0%})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvdemo.bench.spread", description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path, help="a blend result JSON of python -m kvdemo.bench")
    p.add_argument("--bound", type=float, default=0.2, help="allowed excess over the median (0.2 = 20 %%)")
    a = p.parse_args(argv)
    try:
        result = json.loads(a.result.read_text())
    except (OSError, ValueError) as exc:
        print(f"kvdemo.bench.spread: cannot read {a.result}: {exc}", file=sys.stderr)
        return 2
    lines = slow_repeats(result, a.bound)
    for line in lines:
        print(f"kvdemo.bench.spread: SLOW REPEAT: {line}")
    if not lines:
        print(f"kvdemo.bench.spread: every blended repeat within {a.bound:.0%} of its median ({a.result.name})")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
