"""One prompt: the full prefill, every variant's blend, the answers decoded in batches and scored against the
full prefill's with kvdemo.quality."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import quality as qm
from .core import StoredKV, blend, check_state, oracle_score, select_top, topk_count
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
    selected: dict[str, int] = field(default_factory=dict)
    gaps_selected: dict[str, float] = field(default_factory=dict)
    oracle_overlap: dict[str, float] = field(default_factory=dict)  # |lmcache ∩ oracle| / k
    self_check: dict[str, float] = field(default_factory=dict)


def run_prompt(llama: ManualLlama, stored: StoredKV, prompt: BlendPrompt, variants: Sequence[Variant],
               check_layer: int, answer_tokens: int, rows_per_batch: int = 8) -> PromptOutcome:
    """Full prefill, shared check-layer state, every variant's blend, answers decoded in batches of rows."""
    import torch

    ids = torch.tensor([prompt.ids], device=llama.device)
    t = prompt.blend_len
    full = llama.new_cache(1, len(prompt.ids))
    full_logits = llama.forward(ids, full)[0]
    loaded = stored.load(prompt)
    state = check_state(llama, ids[:, :t], loaded, check_layer)
    gaps = torch.tensor(prompt.gaps, dtype=torch.long, device=llama.device)
    oracle = oracle_score(loaded, full, t) if any(v.selection == "oracle" for v in variants) else None
    out = PromptOutcome(prompt.label, len(prompt.ids), t, {})

    def reference() -> tuple[list[Any], list[Any]]:
        return [k[0, :t] for k in full.k], [v[0, :t] for v in full.v]

    def blended(var: Variant) -> Callable[[], tuple[list[Any], list[Any]]]:
        count = topk_count(t, var.ratio)
        sel = select_top(oracle if var.selection == "oracle" else state.k_deviation, count)
        if var.selection == "oracle":
            ours = select_top(state.k_deviation, count)
            out.oracle_overlap[var.key] = float(torch.isin(sel, ours).float().mean()) if count else 1.0
        out.gaps_selected[var.key] = float(torch.isin(gaps, sel).float().mean()) if gaps.numel() else 0.0
        if var.gaps == "fresh":
            sel = torch.unique(torch.cat([sel, gaps]))  # sorted
        out.selected[var.key] = int(sel.numel())
        return lambda: blend(llama, loaded, state, sel, var.mask, check_layer,
                             fresh_gaps=gaps if var.gaps == "fresh" else None)

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
