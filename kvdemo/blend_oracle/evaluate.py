"""One prompt: the full prefill, every variant's blend, the answers decoded in batches and scored against the
full prefill's with kvdemo.quality."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import quality as qm
from ..lmcache_patches.selection import parse_policy, select_tensor
from .core import (
    StoredKV,
    blend,
    check_state,
    oracle_score,
    question_attention,
    recompute_layer_fraction,
    select_top,
    topk_count,
)
from .layout import BlendPrompt
from .llama import ManualLlama
from .settings import TOP_K
from .variants import Variant


def top_logprobs(logits_row, k: int = TOP_K) -> dict[int, float]:
    """Top-k raw log-probs (log_softmax over the whole vocabulary, as vLLM returns them)."""
    import torch

    values, idx = torch.log_softmax(logits_row.float(), dim=-1).topk(k)
    return dict(zip(idx.tolist(), values.tolist()))


def answer_rows(llama: ManualLlama, contexts: Sequence[Callable[[], tuple[list[Any], list[Any]]]],
                prompt: BlendPrompt, answer_tokens: int) -> list[qm.Scored]:
    """Each row's context KV (made on demand, then dropped) + the trailing SEP and question prefilled, then
    exactly ``answer_tokens`` greedy tokens, past any end-of-sequence token as the engine harness's requests
    (``ignore_eos``); the rows decode as one batch (all contexts have the same length)."""
    import torch

    n_rows, t = len(contexts), prompt.blend_len
    cache = llama.new_cache(n_rows, len(prompt.ids) + answer_tokens)
    for row, make in enumerate(contexts):
        ks, vs = make()
        for i in range(len(llama.layers)):
            cache.k[i][row, :t] = ks[i]
            cache.v[i][row, :t] = vs[i]
        del ks, vs
    cache.length = t
    tail = torch.tensor([prompt.ids[t:]] * n_rows, device=llama.device)
    logits = llama.forward(tail, cache)
    firsts = [top_logprobs(logits[r]) for r in range(n_rows)]
    tokens = [logits.argmax(dim=-1)]
    for _ in range(answer_tokens - 1):
        tokens.append(llama.forward(tokens[-1][:, None], cache).argmax(dim=-1))
    greedy = torch.stack(tokens, dim=1).tolist()
    return [qm.Scored(g, f) for g, f in zip(greedy, firsts)]


@dataclass
class PromptOutcome:
    """One prompt: per-variant metrics against the full prefill, and what the selections looked like."""

    label: str
    tokens: int
    blend_len: int
    results: dict[str, qm.PromptResult]
    selected: dict[str, int] = field(default_factory=dict)  # tokens recomputed from the check layer on
    layer_fraction: dict[str, float] = field(default_factory=dict)  # core.recompute_layer_fraction
    gaps_selected: dict[str, float] = field(default_factory=dict)
    oracle_overlap: dict[str, float] = field(default_factory=dict)  # |selected ∩ LMCache's| / |selected|
    self_check: dict[str, float] = field(default_factory=dict)


def run_prompt(llama: ManualLlama, stored: StoredKV, prompt: BlendPrompt, variants: Sequence[Variant],
               check_layer: int, answer_tokens: int, rows_per_batch: int = 8) -> PromptOutcome:
    """Full prefill, shared check-layer states, every variant's blend, answers decoded in batches of rows.

    ``check_layer``: the yaml's, for variants that name none; the LMCache selection at that layer (zero gaps,
    same ratio) is what ``oracle_overlap`` compares the other selections with.
    """
    import torch

    ids = torch.tensor([prompt.ids], device=llama.device)
    t = prompt.blend_len
    n_layers = len(llama.layers)
    full = llama.new_cache(1, len(prompt.ids))
    full_logits = llama.forward(ids, full)[0]
    loads: dict[str, Any] = {}
    states: dict[tuple[str, int], Any] = {}

    def loaded(gaps: str):
        if gaps not in loads:
            loads[gaps] = stored.load(prompt, gaps)
        return loads[gaps]

    def state(gaps: str, check: int):
        if not 0 <= check < n_layers:
            raise ValueError(f"check layer {check} outside the model's {n_layers} layers")
        if (gaps, check) not in states:
            states[gaps, check] = check_state(llama, ids[:, :t], loaded(gaps), check)
        return states[gaps, check]

    gaps = torch.tensor(prompt.gaps, dtype=torch.long, device=llama.device)
    spans = [(seg.start, seg.start + seg.length) for seg in prompt.segments]
    oracle = oracle_score(loaded("zero"), full, t) if any(v.selection == "oracle" for v in variants) else None
    questions: dict[int, Any] = {}
    out = PromptOutcome(prompt.label, len(prompt.ids), t, {})

    def reference() -> tuple[list[Any], list[Any]]:
        return [k[0, :t] for k in full.k], [v[0, :t] for v in full.v]

    def selection(var: Variant, st, check: int, count: int):
        if var.selection == "lmcache":
            return select_top(st.k_deviation, count)
        if var.selection == "oracle":
            return select_top(oracle, count)
        if var.selection in ("question", "question_dev"):
            if check not in questions:
                questions[check] = question_attention(llama, st, ids[:, t:], check)
            score = questions[check] * (st.k_deviation if var.selection == "question_dev" else 1.0)
            return select_top(score, count)
        return select_tensor(parse_policy(var.selection), spans, st.k_deviation, count)

    def blended(var: Variant) -> Callable[[], tuple[list[Any], list[Any]]]:
        check = check_layer if var.check is None else var.check
        load = "zero" if var.gaps == "fresh" else var.gaps  # fresh gaps: LMCache's load, then recomputed
        kv, st = loaded(load), state(load, check)
        count = topk_count(t, var.ratio)
        sel = selection(var, st, check, count)
        if (var.selection, load, check) != ("lmcache", "zero", check_layer) and count:
            ours = select_top(state("zero", check_layer).k_deviation, count)
            out.oracle_overlap[var.key] = float(torch.isin(sel, ours).float().mean()) if sel.numel() else 1.0
        out.gaps_selected[var.key] = float(torch.isin(gaps, sel).float().mean()) if gaps.numel() else 0.0
        if var.gaps == "fresh":
            sel = torch.unique(torch.cat([sel, gaps]))  # sorted
        out.selected[var.key] = int(sel.numel())
        out.layer_fraction[var.key] = recompute_layer_fraction(t, int(sel.numel()), check, n_layers)
        fresh = gaps if var.gaps == "fresh" else None
        return lambda: blend(llama, kv, st, sel, var.mask, check, fresh_gaps=fresh)

    makers = [reference] + [blended(v) for v in variants]
    answers: list[qm.Scored] = []
    for i in range(0, len(makers), rows_per_batch):
        answers += answer_rows(llama, makers[i:i + rows_per_batch], prompt, answer_tokens)
    ref = answers[0]
    ref_full = top_logprobs(full_logits)
    out.self_check["question_path_vs_full_prefill_max_abs_logprob"] = max(
        abs(ref_full[tok] - ref.first_top.get(tok, float("inf"))) for tok in ref_full)
    for var, ans in zip(variants, answers[1:]):
        out.results[var.key] = qm.compare(ref, ans, {}, {})
    return out
