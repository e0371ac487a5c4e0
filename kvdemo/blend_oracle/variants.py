"""The variants computed per recompute ratio (exact, bottom_right, gaps, oracle; see the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .settings import VARIANTS


@dataclass(frozen=True)
class Variant:
    key: str
    ratio: float
    mask: str  # "exact" or "bottom_right"
    selection: str  # "lmcache" (K deviation at the check layer) or "oracle"
    gaps: str  # "zero" (LMCache) or "fresh"


def plan_variants(ratios: Sequence[float], kinds: Sequence[str]) -> list[Variant]:
    """One variant per ratio and kind, leaving out those identical to another (ratio 0 and 1: masks coincide)."""
    unknown = [k for k in kinds if k not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {','.join(VARIANTS)}")
    out = []
    for r in ratios:
        for kind in kinds:
            edge = r <= 0 or r >= 1
            if edge and kind in ("bottom_right", "oracle"):
                continue
            mask = "bottom_right" if kind == "bottom_right" else "exact"
            out.append(Variant(f"r{r:g}/{kind}", r, mask, "oracle" if kind == "oracle" else "lmcache",
                               "fresh" if kind == "gaps" else "zero"))
    return out
