"""The exact attention mask for LMCache's partial recompute (CacheBlend), as a FlexAttention block mask.

WHY: after its check layer, LMCache 0.5.3 recomputes only the k selected tokens (sorted positions
``p_0 < p_1 < ... < p_{k-1}`` out of N) and calls FlashAttention with ``causal=True`` on k queries and N
keys. FlashAttention aligns that causal mask bottom-right, so selected query i attends keys
``0 .. N-k+i`` although its true position is ``p_i <= N-k+i``: every recomputed chunk token also sees
tokens *after* it (https://github.com/LMCache/LMCache/issues/1152,
https://github.com/YaoJiayi/CacheBlend/issues/21). The right mask is ``key <= p_i``.

How: a plan built once per request from the positions (plain index arithmetic, below) and reused in
every layer. Per tile of 128 selected queries (positions ``p_min .. p_max``), key blocks of 128 below
``(p_min + 1) // 128`` are fully visible, blocks up to ``p_max // 128`` are partial (``key <= p_i`` per
element), the rest are skipped: about ``sum(p_i)`` key visits instead of ``k * N``. Where vLLM's
FlashAttention is importable (the engines), FlashAttention 3 computes the fully visible blocks (paged,
non-causal, one sequence per tile) and FlexAttention only the partial band, merged by log-sum-exp in one
compiled kernel; elsewhere (CPU tests) FlexAttention computes every block. Measurements: docs/benchmarks.md.

The arithmetic is written once for ints and tensors alike (:func:`tile_kv_blocks`), so the CPU test
checks the same expressions the GPU path evaluates. ``python -m kvdemo.blend_mask --self-check`` runs the
GPU check: both exact paths against an SDPA oracle with an explicit boolean mask, and their time against
the bottom-right causal call LMCache makes (vLLM's FlashAttention 3 where vLLM is importable).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Q_BLOCK = 128
KV_BLOCK = 128


def tile_kv_blocks(p_min: Any, p_max: Any, kv_block: int = KV_BLOCK) -> tuple[Any, Any, Any]:
    """For a query tile whose positions span ``p_min .. p_max``: ``(full, first_partial, last_partial)``.

    Key blocks ``0 .. full-1`` are visible to every query of the tile (each block's last key
    ``b*kv_block + kv_block - 1 <= p_min``); blocks ``first_partial .. last_partial`` (``first_partial ==
    full``) need the per-element mask; a tile with ``last_partial < first_partial`` has no partial block.
    Works on Python ints and, elementwise, on integer tensors.
    """
    full = (p_min + 1) // kv_block
    return full, full, p_max // kv_block


@dataclass(frozen=True)
class TilePlan:
    """The block structure of one query tile (CPU reference form of what the tensors hold)."""

    full_blocks: list[int]
    partial_blocks: list[int]


def plan_tiles(positions: Sequence[int], q_block: int = Q_BLOCK, kv_block: int = KV_BLOCK) -> list[TilePlan]:
    """The tiles of sorted ``positions`` in plain Python: which key blocks are full or partial per tile."""
    if any(b <= a for a, b in itertools.pairwise(positions)):
        raise ValueError("positions must be strictly increasing")
    tiles = []
    for start in range(0, len(positions), q_block):
        tile = positions[start:start + q_block]
        full, first, last = tile_kv_blocks(tile[0], tile[-1], kv_block)
        tiles.append(TilePlan(list(range(full)), list(range(first, last + 1))))
    return tiles


def allowed_keys(position: int) -> range:
    """Keys a token at ``position`` attends to in a full causal prefill: what the mask must reproduce."""
    return range(position + 1)


# --------------------------------------------------------------------------------------------------
# Torch side (imported lazily: CI has no torch)
# --------------------------------------------------------------------------------------------------

_compiled_flex: Any = None


def flex_attention_fn() -> Any:
    """FlexAttention compiled once per process with dynamic shapes (k and N change with every request)."""
    global _compiled_flex
    if _compiled_flex is None:
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        if torch.cuda.is_available():
            _compiled_flex = torch.compile(flex_attention, dynamic=True, fullgraph=True)
        else:  # CPU (tests): FlexAttention's eager reference path
            _compiled_flex = flex_attention
    return _compiled_flex


def _tiles(positions: Any, n_keys: int, q_block: int, kv_block: int) -> tuple[Any, ...]:
    """Tensors of the block structure: padded positions, per-tile (full, first, last), block counts."""
    import torch

    positions = positions.to(torch.int64)
    k = positions.shape[0]
    n_tiles = -(-k // q_block)
    padded = torch.cat([positions, positions[-1:].expand(n_tiles * q_block - k)])  # padded rows: last query
    tiles = padded.view(n_tiles, q_block)
    full, first, last = tile_kv_blocks(tiles[:, 0], tiles[:, -1], kv_block)
    return padded, full, first, last, n_tiles, -(-n_keys // kv_block)


def build_block_mask(positions: Any, n_keys: int, q_block: int = Q_BLOCK, kv_block: int = KV_BLOCK,
                     with_full_blocks: bool = True) -> Any:
    """A FlexAttention ``BlockMask`` for queries at sorted ``positions`` (int tensor) over ``n_keys`` keys.

    ``with_full_blocks=False``: only the partial (diagonal) blocks, for the split path where FlashAttention
    computes the fully visible blocks. Built once per request (the positions are the same in every layer).
    """
    return _block_mask(_tiles(positions, n_keys, q_block, kv_block), positions.shape[0], n_keys, q_block,
                       kv_block, with_full_blocks)


def _block_mask(tiles: tuple[Any, ...], k: int, n_keys: int, q_block: int, kv_block: int,
                with_full_blocks: bool) -> Any:
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    padded, full, first, last, n_tiles, n_kv_blocks = tiles
    ar = torch.arange(n_kv_blocks, device=padded.device, dtype=torch.int32)
    partial_num = (last - first + 1).clamp(min=0).to(torch.int32)
    partial_idx = (first.to(torch.int32)[:, None] + ar[None, :]).clamp(max=n_kv_blocks - 1)
    full_num = full.to(torch.int32)[None, None] if with_full_blocks else None
    full_idx = ar.expand(n_tiles, n_kv_blocks).contiguous()[None, None] if with_full_blocks else None

    def key_at_or_before(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return kv_idx <= padded[q_idx]

    kwargs: dict[str, Any] = {}
    if "compute_q_blocks" in BlockMask.from_kv_blocks.__code__.co_varnames:
        kwargs["compute_q_blocks"] = False  # forward only: skip the transposed (backward) indices
    return BlockMask.from_kv_blocks(
        partial_num[None, None], partial_idx[None, None].contiguous(), full_num, full_idx,
        BLOCK_SIZE=(q_block, kv_block), mask_mod=key_at_or_before, seq_lengths=(k, n_keys), **kwargs)


@dataclass
class ExactPlan:
    """Everything one request's exact attention needs, built once at the check layer, used by every layer.

    Split (``split=True``, FlashAttention available): per tile of ``Q_BLOCK`` queries, FlashAttention
    (paged, non-causal) over the key blocks every query of the tile sees, FlexAttention over the partial
    blocks only (``mask``), merged by their log-sum-exps: FlashAttention 3 does most of the work at its
    speed (FlexAttention measured ~2x slower per key on an H200). Otherwise ``mask`` covers every block and
    FlexAttention computes it all.
    """

    split: bool
    mask: Any
    cu_seqlens_q: Any = None  # tile boundaries in the query rows
    seqused_k: Any = None  # keys of the fully visible blocks, per tile
    block_table: Any = None  # [tiles, pages]: every tile reads pages 0.. of the same keys
    n_pages: int = 0
    layers_run: int = 0  # layers this plan has computed (same shapes every layer: guards need checking once)


def build_plan(positions: Any, n_keys: int, split: bool) -> ExactPlan:
    """The plan for queries at sorted ``positions`` over ``n_keys`` keys (split needs one whole key block)."""
    import torch

    n_pages = n_keys // KV_BLOCK  # the fully visible blocks are whole pages below n_keys
    if not split or n_pages == 0:
        return ExactPlan(split=False, mask=build_block_mask(positions, n_keys))
    tiles = _tiles(positions, n_keys, Q_BLOCK, KV_BLOCK)  # once: the block mask and the tile arrays share it
    _, full, _, _, n_tiles, _ = tiles
    device, k = positions.device, positions.shape[0]
    cu = (torch.arange(n_tiles + 1, device=device, dtype=torch.int32) * Q_BLOCK).clamp_(max=k)
    table = torch.arange(n_pages, device=device, dtype=torch.int32).expand(n_tiles, n_pages).contiguous()
    return ExactPlan(split=True, mask=_block_mask(tiles, k, n_keys, Q_BLOCK, KV_BLOCK, with_full_blocks=False),
                     cu_seqlens_q=cu, seqused_k=(full * KV_BLOCK).to(torch.int32), block_table=table,
                     n_pages=n_pages)


def _flex(query: Any, key: Any, value: Any, block_mask: Any, scale: float, flex: Any = None) -> tuple[Any, Any]:
    """FlexAttention (``flex``, default :func:`flex_attention_fn`) on [k, H, d] / [N, Hkv, d] tensors: out
    [1, H, k, d] and its LSE [1, H, k].

    Every caller asks for the LSE, so an engine compiles one FlexAttention graph (at warm-up)."""
    q = query.unsqueeze(0).transpose(1, 2)
    k = key.unsqueeze(0).transpose(1, 2)
    v = value.unsqueeze(0).transpose(1, 2)
    kwargs: dict[str, Any] = {}
    aux_request = None
    try:
        from torch.nn.attention.flex_attention import AuxRequest

        aux_request = kwargs["return_aux"] = AuxRequest(lse=True)
    except ImportError:  # older torch
        kwargs["return_lse"] = True
    result = (flex or flex_attention_fn())(q, k, v, block_mask=block_mask, scale=scale,
                                           enable_gqa=query.shape[1] != key.shape[1], **kwargs)
    if aux_request is not None:
        out, aux = result
        return out, aux.lse
    return result


def exact_attention(query: Any, key: Any, value: Any, block_mask: Any, scale: float) -> Any:
    """Attention of ``query`` [k, H, d] over ``key``/``value`` [N, Hkv, d] under ``block_mask``: [k, H, d].

    Asks for the LSE too (and drops it) so this path runs the graph the split path compiled: without it,
    the first short blend of an engine (keys under one block) compiled a second FlexAttention graph, 10 s
    in the middle of a session on an H200."""
    out, _ = _flex(query, key, value, block_mask, scale)
    return out.transpose(1, 2).squeeze(0)


def merge_by_lse(out_a: Any, lse_a: Any, out_b: Any, lse_b: Any) -> Any:
    """Softmax-exact merge of two attentions over disjoint key sets ([k, H, d] outputs, [H, k] LSEs).

    An empty side has a non-finite LSE (FlashAttention writes +inf or -inf for no keys, FlexAttention -inf).
    Op by op on a GPU this blocks the host (its -inf scalar is copied to the device each call, which waits for
    the stream): engines use :func:`merge_by_lse_fused`."""
    import torch

    neg = torch.tensor(float("-inf"), device=lse_a.device)
    la = torch.where(torch.isfinite(lse_a), lse_a.float(), neg)
    lb = torch.where(torch.isfinite(lse_b), lse_b.float(), neg)
    m = torch.maximum(la, lb)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = (wa + wb).transpose(0, 1)[..., None]
    return (out_a.float() * wa.transpose(0, 1)[..., None] + out_b.float() * wb.transpose(0, 1)[..., None]) / total


_compiled_merge: Any = None


def merge_by_lse_fused(out_a: Any, lse_a: Any, out_b: Any, lse_b: Any) -> Any:
    """:func:`merge_by_lse` compiled once per process on a GPU: one kernel, no host sync (eager on CPU)."""
    global _compiled_merge
    if _compiled_merge is None:
        import torch

        _compiled_merge = (torch.compile(merge_by_lse, dynamic=True, fullgraph=True)
                           if torch.cuda.is_available() else merge_by_lse)
    return _compiled_merge(out_a, lse_a, out_b, lse_b)


def _band_merged(query: Any, key: Any, value: Any, block_mask: Any, scale: float, full_out: Any, full_lse: Any,
                 flex: Any, merge: Any) -> Any:
    """FlexAttention on the band (``flex``), merged (``merge``) with FlashAttention's ``full_out``/``full_lse``."""
    band_out, band_lse = _flex(query, key, value, block_mask, scale, flex=flex)
    return merge(full_out, full_lse, band_out.transpose(1, 2).squeeze(0), band_lse.squeeze(0))


def band_and_merge(query: Any, key: Any, value: Any, block_mask: Any, scale: float, full_out: Any,
                   full_lse: Any) -> Any:
    """The split path's second half as one function: FlexAttention on the band, merged with FlashAttention's
    ``full_out``/``full_lse`` by log-sum-exp, in the query's dtype ([k, H, d])."""
    from torch.nn.attention.flex_attention import flex_attention

    return _band_merged(query, key, value, block_mask, scale, full_out, full_lse, flex_attention,
                        merge_by_lse).to(query.dtype)


_compiled_band_merge: Any = None


def band_and_merge_fn() -> Any:
    """:func:`band_and_merge` compiled once per process on a GPU (one region: one guard check and one wrapper
    per layer instead of two); eager on CPU."""
    global _compiled_band_merge
    if _compiled_band_merge is None:
        import torch

        _compiled_band_merge = (torch.compile(band_and_merge, dynamic=True, fullgraph=True)
                                if torch.cuda.is_available() else band_and_merge)
    return _compiled_band_merge


def exact_attention_split(query: Any, key: Any, value: Any, plan: ExactPlan, scale: float, fa_varlen: Any,
                          fa_version: int | None = None, fused_merge: bool = True, one_region: bool = False,
                          skip_guards: bool = False) -> Any:
    """The split path of :class:`ExactPlan`: FlashAttention for full blocks + FlexAttention for the band.

    ``fused_merge=False`` merges op by op (:func:`merge_by_lse`: a host sync per layer on a GPU);
    ``one_region``: band and merge as one compiled function (:func:`band_and_merge_fn`), in the query's dtype;
    with ``skip_guards`` too, a plan's layers after its first skip Dynamo's guard evaluation
    (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: every layer of a request has the same shapes)."""
    pages = plan.n_pages * KV_BLOCK
    hkv, d = key.shape[1], key.shape[2]
    k_cache = key[:pages].view(plan.n_pages, KV_BLOCK, hkv, d)
    v_cache = value[:pages].view(plan.n_pages, KV_BLOCK, hkv, d)
    kwargs = {"fa_version": fa_version} if fa_version is not None else {}
    full_out, full_lse = fa_varlen(q=query, k=k_cache, v=v_cache, max_seqlen_q=Q_BLOCK,
                                   cu_seqlens_q=plan.cu_seqlens_q, max_seqlen_k=pages, seqused_k=plan.seqused_k,
                                   softmax_scale=scale, causal=False, block_table=plan.block_table,
                                   return_softmax_lse=True, **kwargs)
    if not one_region:
        return _band_merged(query, key, value, plan.mask, scale, full_out, full_lse, None,
                            merge_by_lse_fused if fused_merge else merge_by_lse)
    plan.layers_run += 1
    import torch

    guards = (torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
              if skip_guards and plan.layers_run > 1 else contextlib.nullcontext())
    with guards:
        return band_and_merge_fn()(query, key, value, plan.mask, scale, full_out, full_lse)


def run_plan(query: Any, key: Any, value: Any, plan: ExactPlan, scale: float, fa_varlen: Any = None,
             fa_version: int | None = None, fused_merge: bool = True, one_region: bool = False,
             skip_guards: bool = False) -> Any:
    """Exact attention [k, H, d] of one layer under a request's plan (options: :func:`exact_attention_split`)."""
    if plan.split:
        if fa_varlen is None:
            raise ValueError("a split plan needs FlashAttention's varlen function")
        return exact_attention_split(query, key, value, plan, scale, fa_varlen, fa_version, fused_merge,
                                     one_region, skip_guards)
    return exact_attention(query, key, value, plan.mask, scale)


def vllm_flash_attn_varlen() -> Any:
    """vLLM's FlashAttention varlen function (what LMCache calls), or None where vLLM is absent."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def reference_attention(query: Any, key: Any, value: Any, positions: Any, scale: float) -> Any:
    """The oracle: SDPA with an explicit boolean mask ``key <= p_i`` (too slow to serve; right for tests)."""
    import torch
    import torch.nn.functional as F

    n = key.shape[0]
    mask = torch.arange(n, device=key.device)[None, :] <= positions.to(key.device)[:, None]
    q = query.unsqueeze(0).transpose(1, 2)
    k = key.unsqueeze(0).transpose(1, 2)
    v = value.unsqueeze(0).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).squeeze(0)


def bottom_right_attention(query: Any, key: Any, value: Any, scale: float) -> Any:
    """What LMCache 0.5.3 computes today: causal aligned bottom-right (query i sees keys 0..N-k+i)."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    q = query.unsqueeze(0).transpose(1, 2)
    k = key.unsqueeze(0).transpose(1, 2)
    v = value.unsqueeze(0).transpose(1, 2)
    if q.shape[1] != k.shape[1]:  # causal_lower_right has no enable_gqa: repeat the KV heads
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                         scale=scale)
    return out.transpose(1, 2).squeeze(0)


def spread_positions(n_keys: int, k: int, seed: int = 0) -> Any:
    """k sorted distinct positions out of n_keys, chosen at random (how the check layer's top-k falls)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_keys, generator=g)[:k].sort().values


# --------------------------------------------------------------------------------------------------
# GPU self-check: python -m kvdemo.blend_mask --self-check
# --------------------------------------------------------------------------------------------------

SELF_CHECK_SHAPES = (  # (name, N keys, ratio, heads, kv heads, head dim, where the recomputed tokens are)
    ("smollm2-135m 6K", 6000, 0.15, 9, 3, 64, "spread"),
    ("mistral-7b 16K", 16384, 0.15, 32, 8, 128, "spread"),
    ("mistral-7b 16K late", 16384, 0.15, 32, 8, 128, "late"),
    ("mistral-7b 16K chunk starts", 16384, 0.15, 32, 8, 128, "chunks"),
    ("mistral-7b 24K", 24576, 0.15, 32, 8, 128, "spread"),
    ("mistral-7b 24K late", 24576, 0.15, 32, 8, 128, "late"),
    ("mistral-7b 24K chunk starts", 24576, 0.15, 32, 8, 128, "chunks"),
    ("mistral-7b 16K r0.02", 16384, 0.02, 32, 8, 128, "spread"),
    ("mistral-7b 16K r0.50", 16384, 0.50, 32, 8, 128, "spread"),
)
CHUNKS = 8  # the "chunks" pattern: the first tokens of each of this many equal chunks


def check_positions(n_keys: int, k: int, where: str) -> Any:
    """Recomputed positions: spread over the prompt, all in its last quarter (the costliest case), or the
    first ``k / CHUNKS`` tokens of each of ``CHUNKS`` equal chunks."""
    import torch

    if where == "late":
        start = n_keys - max(k, n_keys // 4)
        return spread_positions(n_keys - start, k) + start
    if where == "chunks":
        per, size = -(-k // CHUNKS), n_keys // CHUNKS
        starts = torch.arange(CHUNKS)[:, None] * size + torch.arange(min(per, size))[None, :]
        return starts.flatten()[:k].sort().values
    return spread_positions(n_keys, k)


def _time_ms(fn: Any, iters: int) -> tuple[float, float]:
    """(GPU-bound ms per call: back to back, one sync at the end; host ms per call: the Python call alone)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    host = 0.0
    start = time.perf_counter()
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        host += time.perf_counter() - t
    sync()
    return (time.perf_counter() - start) / iters * 1e3, host / iters * 1e3


def vllm_fa_bottom_right(fa_varlen: Any) -> Any:
    """vLLM's FlashAttention varlen call as LMCache makes it (bottom-right causal, FA3 as on Hopper)."""
    import torch

    def call(query: Any, key: Any, value: Any, scale: float) -> Any:
        k, n = query.shape[0], key.shape[0]
        cu_q = torch.tensor([0, k], dtype=torch.int32, device=query.device)
        cu_k = torch.tensor([0, n], dtype=torch.int32, device=query.device)
        return fa_varlen(q=query, k=key, v=value, cu_seqlens_q=cu_q, max_seqlen_q=k, cu_seqlens_k=cu_k,
                         max_seqlen_k=n, softmax_scale=scale, causal=True, fa_version=3)
    return call


def _timed(row: dict, name: str, fn: Any, iters: int, want: Any = None) -> None:
    """Add ``<name>_ms`` and ``<name>_host_ms`` (and the max abs error against ``want``) to ``row``."""
    if want is not None:
        row[f"max_abs_err_{name}"] = (fn().float() - want).abs().max().item()
    row[f"{name}_ms"], row[f"{name}_host_ms"] = _time_ms(fn, iters)


# The split path's variants the self-check times (KVDEMO_MASK_VARIANT names them in the engines).
SPLIT_VARIANTS: dict[str, dict[str, bool]] = {
    "split": {"fused_merge": False},
    "split_fused": {"fused_merge": True},
    "split_one": {"one_region": True},
    "split_one_skip_guards": {"one_region": True, "skip_guards": True},
}


def self_check(iters: int = 20, device_name: str = "cuda", shapes: tuple = SELF_CHECK_SHAPES,
               fa: Any = None) -> dict:
    """Exact paths vs an SDPA oracle (max abs error) and their time vs the bottom-right call, on this GPU.

    Every variant of the split path (:data:`SPLIT_VARIANTS`) is timed, GPU time
    per call and the host's time to issue it: a blend is host-bound where the host's is the larger."""
    import torch

    device = torch.device(device_name)
    fa = fa or vllm_flash_attn_varlen()
    rows = []
    t0 = time.perf_counter()
    for name, n, ratio, h, hkv, d, where in shapes:
        k = max(1, int(n * ratio))
        pos = check_positions(n, k, where).to(device)
        gen = torch.Generator(device=device).manual_seed(1)
        q = torch.randn(k, h, d, device=device, dtype=torch.bfloat16, generator=gen)
        key = torch.randn(n, hkv, d, device=device, dtype=torch.bfloat16, generator=gen)
        val = torch.randn(n, hkv, d, device=device, dtype=torch.bfloat16, generator=gen)
        scale = 1 / math.sqrt(d)
        want = reference_attention(q.float(), key.float(), val.float(), pos, scale)
        flex_plan = build_plan(pos, n, split=False)
        row: dict[str, Any] = {"case": name, "n_keys": n, "queries": k, "heads": h, "kv_heads": hkv,
                               "head_dim": d, "positions": where,
                               "max_abs_err_bottom_right": (bottom_right_attention(q, key, val, scale).float()
                                                            - want).abs().max().item()}
        _timed(row, "plan_flex", functools.partial(build_plan, pos, n, False), iters)
        _timed(row, "exact_flex", functools.partial(run_plan, q, key, val, flex_plan, scale), iters, want)
        if fa is not None:
            split_plan = build_plan(pos, n, split=True)
            _, full, first, last, _, _ = _tiles(pos, n, Q_BLOCK, KV_BLOCK)
            row.update(tiles=int(full.shape[0]), full_blocks=int(full.sum()),
                       band_blocks=int((last - first + 1).clamp(min=0).sum()))
            _timed(row, "plan_split", functools.partial(build_plan, pos, n, True), iters)
            for variant, options in SPLIT_VARIANTS.items():
                _timed(row, f"exact_{variant}", functools.partial(run_plan, q, key, val, split_plan, scale, fa, 3,
                                                                  **options), iters, want)
            _timed(row, "bottom_right_vllm_fa3", functools.partial(vllm_fa_bottom_right(fa), q, key, val, scale),
                   iters)
        rows.append(row)
        print(json.dumps(row), flush=True)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else device_name
    return {"device": gpu, "torch": torch.__version__, "iters": iters,
            "flash_attention": "vllm.vllm_flash_attn FA3" if fa is not None else "absent",
            "total_s": time.perf_counter() - t0, "cases": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvdemo.blend_mask", description=__doc__.splitlines()[0])
    p.add_argument("--self-check", action="store_true", help="run the GPU check and print JSON")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    if not a.self_check:
        p.print_help()
        return 0
    result = self_check()
    text = json.dumps(result, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)
    bad = [r["case"] for r in result["cases"]
           if max(v for key, v in r.items() if key.startswith("max_abs_err_exact")) > 2e-2]
    if bad:
        print(f"kvdemo.blend_mask: exact mask differs from the oracle in {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
