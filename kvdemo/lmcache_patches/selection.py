"""Fix 'selection': which blended tokens LMCache recomputes, by a policy named in ``KVDEMO_RECOMPUTE_POLICY``.

LMCache 0.5.3 recomputes, from its check layer on, the ``budget = max(int(T * ratio), 1)`` tokens whose
fresh K deviates most from the loaded K at the check layer, over all ``T`` blended tokens. With the env
unset (or ``lmcache``) this fix changes nothing: both wraps return the original's result. Grammar::

    KVDEMO_RECOMPUTE_POLICY = "" | "lmcache" | "epic:K" | "first:K" | "per_chunk"      (K: an integer >= 1)

* ``lmcache``: LMCache's own selection (the original code runs).
* ``epic:K``: the first ``K`` tokens of every chunk, then the ``budget - |first|`` tokens of largest K
  deviation among the rest; the count is ``max(budget, |first|)`` (the first tokens are never dropped).
* ``first:K``: the first ``K`` tokens of every chunk only (the budget is not used).
* ``per_chunk``: the budget split over the chunks in proportion to their length (largest remainder), the
  largest K deviations within each chunk.

Chunks ("spans") are the stored segments LMCache loads: the ``(start, end)`` pairs its ``retrieve_layer``
hands to the GPU connector's ``batched_to_gpu`` (the prompt split at the ``blend_special_str`` ids, the
separators themselves in no span). A span that starts at position 0 is a prefix of both the prompt and the
request that stored it, so its KV is already exact: it gets no first tokens and no share of a per-chunk
budget (it only takes what is left once every other token is picked). For ``per_chunk`` the separator before
a chunk counts with it (pieces end at each span's end; the precompute request was ``[BOS]+SEP+chunk``).
Ties in deviation go to the lower position. The policy acts at the first check layer (kvdemo's configs have
one); a spans record that does not fit the blend leaves LMCache's selection in place (logged once).

The selection is plain index arithmetic: :func:`select_positions` on Python lists (the definition),
:func:`select_tensor` the same on a score tensor, without host synchronization (sizes are host ints from the
spans and the budget; index tensors are made on the scores' device). kvdemo.blend_oracle measures both
policies with these same functions. ``process_qkv``'s check-layer step is an edited copy of lmcache 0.5.3
blend/blender.py (hence the version gate); every edit is marked ``kvdemo:``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .hooks import copied_version_matches, logger, wrap_method
from .targets import MOD_BLENDER, MOD_GPU_CONNECTORS

ENV_POLICY = "KVDEMO_RECOMPUTE_POLICY"
SPANS_ATTR = "_kvdemo_spans"  # on the GPU connector: the (start, end) of each segment of its last load
KINDS = ("lmcache", "epic", "first", "per_chunk")
_said: set[str] = set()

Span = tuple[int, int]


@dataclass(frozen=True)
class Policy:
    kind: str  # one of KINDS
    k: int = 0  # first tokens per chunk (epic, first)

    def __str__(self) -> str:
        return f"{self.kind}:{self.k}" if self.kind in ("epic", "first") else self.kind


@functools.lru_cache(maxsize=16)
def parse_policy(text: str | None) -> Policy | None:
    """``KVDEMO_RECOMPUTE_POLICY``'s value as a Policy; None when empty; ValueError naming the grammar."""
    value = (text or "").strip().lower()
    if not value:
        return None
    kind, colon, arg = value.partition(":")
    kind = kind.strip().replace("-", "_")
    if kind in ("lmcache", "per_chunk") and not colon:
        return Policy(kind)
    if kind in ("epic", "first") and arg.strip().isdigit() and int(arg) >= 1:
        return Policy(kind, int(arg))
    raise ValueError(f"{ENV_POLICY}={text!r}: expected lmcache, per_chunk, epic:K or first:K (K >= 1)")


# --------------------------------------------------------------------------------------------------
# The selection: index arithmetic on spans and a budget
# --------------------------------------------------------------------------------------------------


def normalize_spans(spans: Sequence[Sequence[int]], n: int) -> list[Span]:
    """Spans clipped to ``[0, n)``, empty ones dropped, sorted; ValueError if two overlap."""
    out = sorted((max(0, int(s)), min(n, int(e))) for s, e in spans)
    out = [(s, e) for s, e in out if s < e]
    for (_, e0), (s1, _) in itertools.pairwise(out):
        if s1 < e0:
            raise ValueError(f"overlapping spans {out}")
    return out


def first_ranges(spans: Sequence[Span], k: int) -> list[Span]:
    """The first ``k`` positions of every span not starting at 0, as ranges (spans normalized)."""
    return [(s, min(e, s + k)) for s, e in spans if s > 0]


def largest_remainder(lengths: Sequence[int], budget: int) -> list[int]:
    """``budget`` split in proportion to ``lengths`` (floors, then one more to the largest remainders, ties to
    the earlier); each share at most its length when ``budget <= sum(lengths)``."""
    total = sum(lengths)
    if total <= 0 or budget <= 0:
        return [0] * len(lengths)
    shares = [budget * n // total for n in lengths]
    left = budget - sum(shares)
    for i in sorted(range(len(lengths)), key=lambda i: (-(budget * lengths[i] % total), i))[:left]:
        shares[i] += 1
    return shares


def per_chunk_plan(spans: Sequence[Span], n: int, budget: int) -> list[tuple[int, int, int]]:
    """``(start, end, count)`` per piece with a count: ``[0, n)`` cut at every span's end, each piece
    (separator + chunk) taking its share of ``budget``; a leading prefix span's piece only what the others
    cannot hold (spans normalized, ``0 <= budget <= n``)."""
    cuts = sorted({e for _, e in spans if 0 < e < n} | {n})
    pieces = list(zip([0] + cuts[:-1], cuts))
    prefix = bool(spans) and spans[0][0] == 0 and len(pieces) > 1
    shared = pieces[1:] if prefix else pieces
    room = sum(e - s for s, e in shared)
    counts = largest_remainder([e - s for s, e in shared], min(budget, room))
    plan = [(s, e, c) for (s, e), c in zip(shared, counts) if c]
    if prefix and budget > room:
        plan.insert(0, (pieces[0][0], pieces[0][1], budget - room))
    return plan


def select_positions(policy: Policy, spans: Sequence[Sequence[int]], scores: Sequence[float],
                     budget: int) -> list[int]:
    """The sorted positions ``policy`` recomputes, given the chunk spans, one score per blended token
    (LMCache's K deviation) and the budget (LMCache's ``max(int(T * ratio), 1)``; clipped to ``[0, T]``)."""
    n = len(scores)
    budget = min(max(budget, 0), n)
    spans = normalize_spans(spans, n)

    def best(positions, count: int) -> list[int]:
        return sorted(positions, key=lambda i: (-scores[i], i))[:max(count, 0)]

    if policy.kind == "lmcache":
        return sorted(best(range(n), budget))
    if policy.kind in ("epic", "first"):
        forced = [i for s, e in first_ranges(spans, policy.k) for i in range(s, e)]
        if policy.kind == "first":
            return forced
        taken = set(forced)
        return sorted(forced + best((i for i in range(n) if i not in taken), budget - len(forced)))
    if policy.kind == "per_chunk":
        return sorted(i for s, e, c in per_chunk_plan(spans, n, budget) for i in best(range(s, e), c))
    raise ValueError(f"unknown policy {policy.kind!r}")


def select_tensor(policy: Policy, spans: Sequence[Sequence[int]], scores: Any, budget: int) -> Any:
    """:func:`select_positions` on a 1-D tensor of finite scores: a sorted int64 tensor on its device.

    Sizes come from host ints (spans, budget, ``scores.shape``); no ``.item()``, no host list copied to the
    device. Deviation order is a stable descending sort (ties to the lower position, as the list version).
    """
    import torch

    n = int(scores.shape[0])
    budget = min(max(budget, 0), n)
    spans = normalize_spans(spans, n)

    def best(values: Any, count: int) -> Any:
        return torch.sort(values, descending=True, stable=True).indices[:max(count, 0)]

    if policy.kind == "lmcache":
        picked = best(scores, budget)
    elif policy.kind in ("epic", "first"):
        ranges = first_ranges(spans, policy.k)
        n_forced = sum(e - s for s, e in ranges)
        key = scores.to(torch.float32, copy=True)
        for s, e in ranges:
            key.narrow(0, s, e - s).fill_(float("inf"))
        picked = best(key, n_forced if policy.kind == "first" else max(budget, n_forced))
    elif policy.kind == "per_chunk":
        parts = [best(scores.narrow(0, s, e - s), c) + s for s, e, c in per_chunk_plan(spans, n, budget)]
        picked = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=scores.device)
    else:
        raise ValueError(f"unknown policy {policy.kind!r}")
    return torch.sort(picked).values


# --------------------------------------------------------------------------------------------------
# The patch
# --------------------------------------------------------------------------------------------------


def say_once(key: str, text: str, *args: Any, level: int = logging.INFO) -> None:
    if key not in _said:
        _said.add(key)
        logger.log(level, text, *args)


def active_policy() -> Policy | None:
    """The policy this process's env names; None (LMCache's selection) when unset or unparsable (logged)."""
    try:
        return parse_policy(os.environ.get(ENV_POLICY))
    except ValueError as exc:
        say_once("bad-policy", "kvdemo plugin: selection: %s; LMCache's selection is used", exc,
                 level=logging.WARNING)
        return None


def blend_spans(connector: Any, n_tokens: int) -> list[Span] | None:
    """The spans of the connector's last load if they lie in ``[0, n_tokens)`` without overlap, else None."""
    spans = getattr(connector, SPANS_ATTR, None)
    if not spans or any(not 0 <= s < e <= n_tokens for s, e in spans):
        return None
    try:
        return normalize_spans(spans, n_tokens)
    except ValueError:
        return None


def patch_connector_spans(module: ModuleType) -> None:
    """Wrap ``VLLMBufferLayerwiseGPUConnector.batched_to_gpu`` to keep the ``(start, end)`` of each loaded
    segment on the connector (host ints it is given anyway), for the blender's check layer."""
    def make(original: Any) -> Any:
        def batched_to_gpu(self: Any, starts: Any, ends: Any, *args: Any, **kwargs: Any) -> Any:
            setattr(self, SPANS_ATTR, tuple(zip(starts, ends)))
            return original(self, starts, ends, *args, **kwargs)
        return batched_to_gpu

    wrap_method(module, "VLLMBufferLayerwiseGPUConnector.batched_to_gpu", "selection", make,
                "keeps the loaded segments' spans for the recompute policy")


def patch_process_qkv(module: ModuleType) -> None:
    """Wrap ``LMCBlender.process_qkv``: at the first check layer, with a policy set, it picks the tokens."""
    if not copied_version_matches("selection", "LMCBlender.process_qkv (check-layer selection)"):
        return
    torch = module.torch

    def make(original: Any) -> Any:
        def process_qkv(self: Any, q: Any, k: Any, v: Any, residual: Any, layer_id: int, attn_output: Any,
                        attn_metadata: Any) -> Any:
            policy = active_policy()
            if policy is None or policy.kind == "lmcache" or self.metadata.imp_indices is not None or \
                    layer_id not in self.common_metadata.check_layers:
                return original(self, q, k, v, residual, layer_id, attn_output, attn_metadata)
            spans = blend_spans(self.gpu_connector, int(q.shape[0]))
            if spans is None:
                say_once("no-spans", "kvdemo plugin: selection: no segment spans for this blend; LMCache's "
                         "selection is used", level=logging.WARNING)
                return original(self, q, k, v, residual, layer_id, attn_output, attn_metadata)
            return check_layer_step(self, torch, policy, spans, q, k, v, residual, layer_id, attn_output,
                                    attn_metadata)
        return process_qkv

    policy = active_policy()
    wrap_method(module, "LMCBlender.process_qkv", "selection", make,
                f"picks the recomputed tokens by {ENV_POLICY}: " +
                (f"{policy} here" if policy else "unset here, LMCache's selection"))


def check_layer_step(self: Any, torch: Any, policy: Policy, spans: list[Span], q: Any, k: Any, v: Any,
                     residual: Any, layer_id: int, attn_output: Any, attn_metadata: Any) -> Any:
    """lmcache 0.5.3 ``LMCBlender.process_qkv`` at a check layer, its top-k replaced by
    :func:`select_tensor`."""
    old_k, old_v = self.gpu_connector.get_kv(layer_id)
    if attn_output is None:
        attn_output = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if self.metadata.positions is None:
        self.metadata.positions = torch.arange(q.shape[0], device=q.device, dtype=torch.int64)
    attn_layer = self.layerwise_model.vllm_model.model.layers[layer_id].self_attn
    q, k = attn_layer.rotary_emb(self.metadata.positions, q, k)

    diff_k = torch.sum((k.to(torch.float32) - old_k.to(torch.float32)) ** 2, dim=[1])
    total_len = diff_k.shape[0]
    topk_num = max(int(total_len * self.common_metadata.recomp_ratios[0]), 1)
    top_indices = select_tensor(policy, spans, diff_k, topk_num)  # kvdemo: was torch.topk, then torch.sort
    count = top_indices.shape[0]  # kvdemo: may exceed topk_num (epic, first)
    say_once("used", "kvdemo plugin: selection: policy %s recomputes %d of %d tokens (LMCache's top-k: %d)",
             policy, count, total_len, topk_num)

    k, v = k[top_indices], v[top_indices]
    q = q[top_indices]
    residual = residual[top_indices]
    self.metadata.imp_indices = top_indices
    self.metadata.positions = self.metadata.positions[top_indices]
    attn_output = attn_output[:count]
    attn_metadata.update_from_top_indices(top_indices)

    old_k[top_indices] = k
    old_v[top_indices] = v
    return q, old_k, old_v, residual, attn_output, attn_metadata


def reset() -> None:
    """Forget what was said and the parsed policies (tests)."""
    _said.clear()
    parse_policy.cache_clear()


PATCHES = ((MOD_GPU_CONNECTORS, patch_connector_spans), (MOD_BLENDER, patch_process_qkv))
