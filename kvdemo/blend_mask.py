"""The exact attention mask for LMCache's partial recompute (CacheBlend), as a FlexAttention block mask.

WHY: after its check layer, LMCache 0.5.3 recomputes only the k selected tokens (sorted positions
``p_0 < p_1 < ... < p_{k-1}`` out of N) and calls FlashAttention with ``causal=True`` on k queries and N
keys. FlashAttention aligns that causal mask bottom-right, so selected query i attends keys
``0 .. N-k+i`` although its true position is ``p_i <= N-k+i``: every recomputed chunk token also sees
tokens *after* it (LMCache issue #1152, CacheBlend issue #21). The right mask is ``key <= p_i``.

How: one FlexAttention call per layer over the k selected queries and all N keys, with a ``BlockMask``
built once per request from the positions (plain index arithmetic, below) and reused in every layer.
Per tile of 128 selected queries (positions ``p_min .. p_max``), key blocks of 128 below
``(p_min + 1) // 128`` are fully visible (no mask evaluated), blocks up to ``p_max // 128`` are partial
(``key <= p_i`` evaluated per element), the rest are skipped. That is less attention work than the
bottom-right mask: about ``sum(p_i)`` key visits instead of ``k * N``.

The arithmetic is written once for ints and tensors alike (:func:`tile_kv_blocks`), so the CPU test
checks the same expressions the GPU path evaluates. ``python -m kvdemo.blend_mask --self-check`` runs the
GPU check: FlexAttention with this mask against an SDPA oracle with an explicit boolean mask, and the
time against SDPA's bottom-right causal (what LMCache computes today).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

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


def build_block_mask(positions: Any, n_keys: int, q_block: int = Q_BLOCK, kv_block: int = KV_BLOCK) -> Any:
    """A FlexAttention ``BlockMask`` for queries at sorted ``positions`` (int tensor) over ``n_keys`` keys.

    Built once per request (the positions are the same in every layer after the check layer).
    """
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    device = positions.device
    positions = positions.to(torch.int64)
    k = positions.shape[0]
    n_tiles = -(-k // q_block)
    padded = torch.cat([positions, positions[-1:].expand(n_tiles * q_block - k)])  # padded rows: last query
    tiles = padded.view(n_tiles, q_block)
    full, first, last = tile_kv_blocks(tiles[:, 0], tiles[:, -1], kv_block)
    n_kv_blocks = -(-n_keys // kv_block)
    ar = torch.arange(n_kv_blocks, device=device, dtype=torch.int32)
    full_num = full.to(torch.int32)
    partial_num = (last - first + 1).clamp(min=0).to(torch.int32)
    full_idx = ar.expand(n_tiles, n_kv_blocks).contiguous()
    partial_idx = (first.to(torch.int32)[:, None] + ar[None, :]).clamp(max=n_kv_blocks - 1)

    def key_at_or_before(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return kv_idx <= padded[q_idx]

    kwargs: dict[str, Any] = {}
    if "compute_q_blocks" in BlockMask.from_kv_blocks.__code__.co_varnames:
        kwargs["compute_q_blocks"] = False  # forward only: skip the transposed (backward) indices
    return BlockMask.from_kv_blocks(
        partial_num[None, None], partial_idx[None, None].contiguous(), full_num[None, None],
        full_idx[None, None], BLOCK_SIZE=(q_block, kv_block), mask_mod=key_at_or_before,
        seq_lengths=(k, n_keys), **kwargs)


def exact_attention(query: Any, key: Any, value: Any, block_mask: Any, scale: float) -> Any:
    """Attention of ``query`` [k, H, d] over ``key``/``value`` [N, Hkv, d] under ``block_mask``: [k, H, d]."""
    q = query.unsqueeze(0).transpose(1, 2)
    k = key.unsqueeze(0).transpose(1, 2)
    v = value.unsqueeze(0).transpose(1, 2)
    out = flex_attention_fn()(q, k, v, block_mask=block_mask, scale=scale,
                              enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).squeeze(0)


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

SELF_CHECK_SHAPES = (  # (name, N keys, ratio, heads, kv heads, head dim)
    ("smollm2-135m 6K", 6000, 0.15, 9, 3, 64),
    ("mistral-7b 16K", 16384, 0.15, 32, 8, 128),
    ("mistral-7b 24K", 24576, 0.15, 32, 8, 128),
    ("mistral-7b 16K r0.02", 16384, 0.02, 32, 8, 128),
    ("mistral-7b 16K r0.50", 16384, 0.50, 32, 8, 128),
)


def _time_ms(fn: Any, iters: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def self_check(iters: int = 20) -> dict:
    """Exact mask vs oracle (max abs error) and time vs bottom-right causal, on this GPU."""
    import torch

    device = torch.device("cuda")
    rows = []
    t0 = time.perf_counter()
    for name, n, ratio, h, hkv, d in SELF_CHECK_SHAPES:
        k = max(1, int(n * ratio))
        pos = spread_positions(n, k).to(device)
        gen = torch.Generator(device=device).manual_seed(1)
        q = torch.randn(k, h, d, device=device, dtype=torch.bfloat16, generator=gen)
        key = torch.randn(n, hkv, d, device=device, dtype=torch.bfloat16, generator=gen)
        val = torch.randn(n, hkv, d, device=device, dtype=torch.bfloat16, generator=gen)
        scale = 1 / math.sqrt(d)
        mask = build_block_mask(pos, n)
        got = exact_attention(q, key, val, mask, scale)
        want = reference_attention(q.float(), key.float(), val.float(), pos, scale)
        leaky = bottom_right_attention(q, key, val, scale)
        err = (got.float() - want).abs().max().item()
        leak_err = (leaky.float() - want).abs().max().item()
        rows.append({
            "case": name, "n_keys": n, "queries": k, "heads": h, "kv_heads": hkv, "head_dim": d,
            "max_abs_err_exact": err, "max_abs_err_bottom_right": leak_err,
            "build_mask_ms": _time_ms(functools.partial(build_block_mask, pos, n), iters),
            "exact_flex_ms": _time_ms(functools.partial(exact_attention, q, key, val, mask, scale), iters),
            "bottom_right_sdpa_ms": _time_ms(functools.partial(bottom_right_attention, q, key, val, scale), iters),
        })
        print(json.dumps(rows[-1]), flush=True)
    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "iters": iters,
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
    bad = [r["case"] for r in result["cases"] if r["max_abs_err_exact"] > 2e-2]
    if bad:
        print(f"kvdemo.blend_mask: exact mask differs from the oracle in {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
