"""Stored KV, loading, the check layer, the selections, the masks and the blend: LMCache 0.5.3's CacheBlend.

What LMCache 0.5.3 does (read from its source; reproduced here):

* Storing (kvdemo.prompts / kvdemo.precompute): ``[BOS]+sys`` and ``[BOS]+SEP+chunk`` are prefilled on their
  own. LMCache's SegmentTokenDatabase splits on SEP's ids and keys each *segment* (``[BOS]+sys``, ``chunk``)
  by its own ids; it stores the segment's post-RoPE K and V of every layer, computed in the context of its
  precompute request (a chunk at positions ``1+len(SEP) ..``), with those positions
  (gpu_connectors.VLLMBufferLayerwiseGPUConnector.batched_from_gpu ``cached_positions``).
* Lookup (cache_engine.lookup): the hit is the prefix up to the end of the last stored segment, i.e. through
  the last chunk. These ``T`` tokens are blended; the trailing SEP and the question are prefilled by vLLM
  over the blended KV.
* Loading (batched_to_gpu): per layer the stored K is re-rotated from its stored positions to its new ones
  (FusedRope: a rotation by ``new - old``), V is copied; the SEP tokens between segments ("gaps") are
  stored nowhere and their K and V are set to **zero** after the re-rotation.
* Blending (blend/blender.py ``process_qkv``, models/base.py ``compute_layer``), layer by layer over the
  ``T`` tokens, positions ``0..T-1``:
  - layers before the check layer (``blend_check_layers: [1]`` → layer 0 only) are recomputed for all
    tokens (fresh Q/K/V, full causal attention), but the KV they leave in vLLM's cache is the *loaded* one
    (re-rotated stored KV, zero gaps): ``old_k[imp_indices] = k`` only runs once tokens are selected;
  - at the check layer the fresh K of all ``T`` tokens (post-RoPE, from the recomputed hidden states) is
    compared with the loaded K: ``diff = sum((k - old_k)**2)`` in fp32 over all KV heads and head dims
    (K only, no V, no normalisation; gaps compare against zero). ``topk_num = max(int(T * ratio), 1)``
    tokens with the largest ``diff`` are taken (``torch.topk``, then sorted by position), counted over all
    ``T`` blended tokens (system prompt and gaps included), nothing is always included;
  - from the check layer on (the check layer itself included) only those tokens are computed: their
    fresh K/V overwrite the loaded ones, and they attend over the ``T`` keys (loaded, with the selected
    rows replaced). LMCache's FlashAttention call is causal with ``k`` queries and ``T`` keys, aligned
    bottom-right: selected query ``i`` sees keys ``0 .. T-k+i``; kvdemo's ``mask`` fix gives it
    ``0 .. p_i`` (its true position). Only ``blend_recompute_ratios[0]`` and one check layer are used.
  - the trailing SEP + question are then computed normally (causal, true positions) over that cache.

torch is imported inside the functions (CI has no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .layout import BlendPrompt
from .llama import KVCache, ManualLlama


@dataclass
class Loaded:
    """Per-layer KV of the blended tokens as LMCache loads it: stored KV re-rotated to the new positions, gaps 0."""

    k: list[Any]  # [T, Hkv, d] per layer
    v: list[Any]


class StoredKV:
    """Each precompute request prefilled once (cached across prompts), as LMCache stores its segment."""

    def __init__(self, llama: ManualLlama) -> None:
        self.llama = llama
        self._done: dict[tuple[int, ...], tuple[list[Any], list[Any]]] = {}

    def request(self, stored: tuple[int, ...]) -> tuple[list[Any], list[Any]]:
        """Per-layer post-RoPE K and V ``[len(stored), Hkv, d]`` of one precompute request."""
        import torch

        if stored not in self._done:
            cache = self.llama.new_cache(1, len(stored))
            self.llama.forward(torch.tensor([stored], device=self.llama.device), cache)
            self._done[stored] = ([k[0] for k in cache.k], [v[0] for v in cache.v])
        return self._done[stored]

    def load(self, prompt: BlendPrompt, gaps: str = "zero") -> Loaded:
        """LMCache's batched_to_gpu: segment KV at new positions (rotation by ``new - old``), gap rows zero.

        ``gaps="stored"``: each gap (the separator before a segment) gets the KV its segment's stored request
        computed for the same ids right before the segment (``[BOS]+SEP+chunk``), moved like the segment.
        """
        import torch

        if gaps not in ("zero", "stored"):
            raise ValueError(f"unknown gaps {gaps!r}")
        llama = self.llama
        shape = (prompt.blend_len, llama.n_kv, llama.head_dim)
        ks = [torch.zeros(shape, dtype=llama.dtype, device=llama.device) for _ in llama.layers]
        vs = [torch.zeros(shape, dtype=llama.dtype, device=llama.device) for _ in llama.layers]
        end = 0
        for seg in prompt.segments:
            k_all, v_all = self.request(seg.stored)
            before = seg.start - end if gaps == "stored" else 0  # the gap rows this segment's request fills
            copy = seg.stored[seg.offset - before:seg.offset] if before <= seg.offset else ()
            if copy != prompt.ids[seg.start - before:seg.start]:
                raise ValueError(f"segment at {seg.start}: its stored request holds no copy of the gap before it")
            first, src, n = seg.start - before, seg.offset - before, seg.length + before
            delta = llama.positions(seg.start - seg.offset, seg.start - seg.offset + 1).expand(n)
            for i in range(len(llama.layers)):
                ks[i][first:first + n] = llama.rope(k_all[i][src:src + n], delta)
                vs[i][first:first + n] = v_all[i][src:src + n]
            end = seg.start + seg.length
        return Loaded(ks, vs)


@dataclass
class CheckState:
    """What every variant of a prompt shares: the layers before the check layer and the check layer's fresh QKV."""

    fresh_k: list[Any]  # layers < check: fresh K [T, Hkv, d] (the blend's own attention uses them)
    fresh_v: list[Any]
    h: Any  # [1, T, D] hidden states entering the check layer
    q: Any  # check layer's fresh q/k/v of all T tokens
    k: Any
    v: Any
    k_deviation: Any  # [T] LMCache's sum((k - old_k)**2) in fp32


def check_state(llama: ManualLlama, ids, loaded: Loaded, check_layer: int) -> CheckState:
    """Layers ``< check_layer`` recomputed for all T tokens; the check layer's QKV and LMCache's K deviation."""
    import torch

    pos = llama.positions(0, ids.shape[1])
    h = llama.embed(ids)
    fresh_k, fresh_v = [], []
    for layer in llama.layers[:check_layer]:
        q, k, v = llama.qkv(layer, h, pos)
        fresh_k.append(k[0])
        fresh_v.append(v[0])
        h = llama.finish(layer, h, llama.attend(layer, q, k, v))
    q, k, v = llama.qkv(llama.layers[check_layer], h, pos)
    diff = ((k[0].to(torch.float32) - loaded.k[check_layer].to(torch.float32)) ** 2).flatten(1).sum(dim=1)
    return CheckState(fresh_k, fresh_v, h, q, k, v, diff)


def topk_count(n_tokens: int, ratio: float) -> int:
    """LMCache 0.5.3: ``max(int(T * ratio), 1)``; ratio 0 (not an LMCache setting) recomputes nothing."""
    return 0 if ratio <= 0 else max(int(n_tokens * ratio), 1)


def select_top(score, count: int):
    """The ``count`` largest scores' indices, sorted by position (LMCache: torch.topk, then torch.sort)."""
    import torch

    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    return torch.sort(torch.topk(score, k=count).indices).values


def query_limits(selected, n_keys: int, mask: str):
    """Last visible key per recomputed query: its position (exact) or ``T-k+i`` (FlashAttention bottom-right)."""
    import torch

    if mask == "exact":
        return selected
    if mask == "bottom_right":
        k = selected.shape[0]
        return torch.arange(n_keys - k, n_keys, device=selected.device)
    raise ValueError(f"unknown mask {mask!r}")


def blend(llama: ManualLlama, loaded: Loaded, state: CheckState, selected, mask: str, check_layer: int,
          fresh_gaps=None) -> tuple[list[Any], list[Any]]:
    """Per-layer KV of the T blended tokens left for the question, as LMCache's layerwise blend leaves it.

    ``selected``: sorted positions recomputed from the check layer on. ``fresh_gaps`` (positions): give
    those rows their fresh KV in the layers before the check layer too (the ``gaps`` variant; LMCache
    leaves the loaded, zeroed rows there).
    """
    import torch

    ks, vs = [], []
    for i in range(check_layer):
        k, v = loaded.k[i].clone(), loaded.v[i].clone()
        if fresh_gaps is not None and fresh_gaps.numel():
            k[fresh_gaps], v[fresh_gaps] = state.fresh_k[i][fresh_gaps], state.fresh_v[i][fresh_gaps]
        ks.append(k)
        vs.append(v)
    n_keys = loaded.k[0].shape[0]
    allowed = torch.arange(n_keys, device=llama.device)[None, :] <= query_limits(selected, n_keys, mask)[:, None]
    h, q, k_new, v_new = state.h[:, selected], state.q[:, selected], state.k[:, selected], state.v[:, selected]
    for i in range(check_layer, len(llama.layers)):
        layer = llama.layers[i]
        if i > check_layer and selected.numel():
            q, k_new, v_new = llama.qkv(layer, h, selected)
        k, v = loaded.k[i].clone(), loaded.v[i].clone()
        k[selected], v[selected] = k_new[0], v_new[0]
        if selected.numel() and i < len(llama.layers) - 1:  # the last layer's output feeds nothing
            h = llama.finish(layer, h, llama.attend(layer, q, k[None], v[None], allowed))
        ks.append(k)
        vs.append(v)
    return ks, vs


def oracle_score(loaded: Loaded, full: KVCache, n_tokens: int):
    """Per token: loaded-vs-full-prefill KV deviation, summed over layers, each layer over its mean ||KV||^2."""
    import torch

    total = torch.zeros(n_tokens, dtype=torch.float32, device=loaded.k[0].device)
    for i in range(len(loaded.k)):
        fk, fv = full.k[i][0, :n_tokens].float(), full.v[i][0, :n_tokens].float()
        dev = ((loaded.k[i].float() - fk) ** 2 + (loaded.v[i].float() - fv) ** 2).flatten(1).sum(dim=1)
        norm = (fk ** 2 + fv ** 2).flatten(1).sum(dim=1).mean().clamp_min(1e-12)
        total += dev / norm
    return total


def question_attention(llama: ManualLlama, state: CheckState, tail, check_layer: int):
    """Per blended token: the attention the tokens after the blend (``tail [1, m]``: SEP + question) pay it at
    the check layer, summed over their query heads and tokens.

    The tail runs through the layers before the check layer over the blend's fresh KV of those layers (what
    LMCache computes there for all tokens), then meets the check layer's fresh K; no full prefill.
    """
    import torch

    t, m = state.h.shape[1], tail.shape[1]
    pos = llama.positions(t, t + m)
    allowed = torch.arange(t + m, device=llama.device)[None, :] <= pos[:, None]
    h = llama.embed(tail)
    for i in range(check_layer):
        layer = llama.layers[i]
        q, k, v = llama.qkv(layer, h, pos)
        keys = torch.cat([state.fresh_k[i][None], k], dim=1)
        values = torch.cat([state.fresh_v[i][None], v], dim=1)
        h = llama.finish(layer, h, llama.attend(layer, q, keys, values, allowed))
    layer = llama.layers[check_layer]
    q, k, _ = llama.qkv(layer, h, pos)
    keys = torch.cat([state.k, k], dim=1).repeat_interleave(llama.n_heads // llama.n_kv, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), keys.float()) * layer.self_attn.scaling
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return probs[0, :, :, :t].sum(dim=(0, 1))


def recompute_layer_fraction(n_tokens: int, n_selected: int, check_layer: int, n_layers: int) -> float:
    """Token-layers the blend computes over a full prefill's of the blended tokens (attention's length aside):
    every token in the layers before the check layer, the selected ones from it on."""
    if n_tokens <= 0:
        return 0.0
    return (n_tokens * check_layer + n_selected * (n_layers - check_layer)) / (n_tokens * n_layers)
