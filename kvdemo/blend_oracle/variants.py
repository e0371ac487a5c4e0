"""The variants computed per recompute ratio (see the package docstring): their keys and what each changes.

Keys (``--variants``): the defaults ``exact``, ``bottom_right``, ``gaps``, ``oracle``, and ``sep_stored``,
``epic<K>`` (e.g. ``epic16``), ``per_chunk``, ``check<L>`` (e.g. ``check2``), ``question``, ``question_dev``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .settings import VARIANTS

# What each key changes against ``exact`` (LMCache's selection, zero gaps, exact mask, the yaml's check layer).
KINDS: dict[str, str] = {
    "exact": "LMCache 0.5.3's selection, zero gaps, exact causal mask",
    "bottom_right": "exact with LMCache's own bottom-right mask",
    "gaps": "separators kept: recomputed in every layer and never zero, on top of the budget",
    "sep_stored": "separators kept at no cost: loaded from the chunk's stored request, not zeroed",
    "oracle": "the tokens whose loaded KV deviates most from the full prefill's (needs the full prefill)",
    "epic<K>": "the first K tokens of every chunk + K-deviation top-(budget - |first|); ratio 0: first K alone",
    "per_chunk": "K-deviation top-k within each chunk, the budget split by chunk length",
    "check<L>": "K deviation at layer L instead of the yaml's check layer",
    "question": "the question's attention to each token at the check layer (the question: layers <= check)",
    "question_dev": "question attention x K deviation",
}
# Kinds whose selection is the whole blend at ratio >= 1, or nothing at ratio 0 (then identical to ``exact``).
_SAME_AT_1 = ("bottom_right", "oracle", "per_chunk", "question", "question_dev", "epic")
_SAME_AT_0 = ("bottom_right", "oracle", "per_chunk", "question", "question_dev", "check")


@dataclass(frozen=True)
class Variant:
    key: str
    ratio: float
    mask: str  # "exact" or "bottom_right"
    selection: str  # "lmcache" (K deviation top-k), "oracle", "question", "question_dev", or a policy of
    #                 kvdemo.lmcache_patches.selection ("epic:16", "per_chunk")
    gaps: str  # "zero" (LMCache), "fresh" (recomputed in every layer) or "stored" (loaded, not zeroed)
    check: int | None = None  # K deviation at this layer; None: the yaml's check layer


def parse_kind(kind: str) -> tuple[str, dict]:
    """``kind``'s family and the Variant fields it sets (ValueError for an unknown key)."""
    if kind in KINDS and "<" not in kind:
        selects = kind in ("oracle", "per_chunk", "question", "question_dev")
        return kind, {"mask": "bottom_right" if kind == "bottom_right" else "exact",
                      "selection": kind if selects else "lmcache",
                      "gaps": {"gaps": "fresh", "sep_stored": "stored"}.get(kind, "zero")}
    m = re.fullmatch(r"(epic|check)(\d+)", kind)
    if m and (m[1] == "check" or int(m[2]) >= 1):
        fields = {"mask": "exact", "selection": "lmcache", "gaps": "zero"}
        if m[1] == "epic":
            fields["selection"] = f"epic:{int(m[2])}"
        else:
            fields["check"] = int(m[2])
        return m[1], fields
    raise ValueError(f"unknown variant {kind!r}; choose from {', '.join(KINDS)} "
                     f"(defaults: {','.join(VARIANTS)})")


def describe(kind: str) -> str:
    """What ``kind`` computes (its KINDS line; ``epic16`` reads ``epic<K>``'s with K = 16)."""
    family, _ = parse_kind(kind)
    m = re.fullmatch(r"(epic|check)(\d+)", kind)
    if m:
        letter = "K" if family == "epic" else "L"
        text = KINDS[f"{family}<{letter}>"]
        return text.replace(f" {letter} ", f" {m[2]} ").replace(f"{letter}:", f"{m[2]}:")
    return KINDS[kind]


def plan_variants(ratios: Sequence[float], kinds: Sequence[str]) -> list[Variant]:
    """One variant per ratio and kind, leaving out those identical to ``exact`` at that ratio (ratio 0 selects
    nothing, ratio 1 everything, whatever the rule; EPIC's first tokens are kept at ratio 0: EPIC alone)."""
    parsed = [(kind, *parse_kind(kind)) for kind in kinds]
    out = []
    for r in ratios:
        for kind, family, fields in parsed:
            if (r >= 1 and family in _SAME_AT_1) or (r <= 0 and family in _SAME_AT_0):
                continue
            out.append(Variant(f"r{r:g}/{kind}", r, **fields))
    return out
