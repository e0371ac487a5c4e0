"""The exact causal mask of LMCache's partial recompute (kvdemo.blend_mask).

The block plan is plain index arithmetic and is checked here against a brute force over every
(query, key) pair: a key block is "full" for a tile when every query of the tile may see every key in it,
"partial" when some may, and absent when none may. The torch part (FlexAttention against an SDPA oracle)
runs where torch is installed; CI has no torch, so it is skipped there, and the GPU check is
``python -m kvdemo.blend_mask --self-check``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from kvdemo import blend_mask as bm


def brute_force_plan(positions: list[int], n_keys: int, q_block: int, kv_block: int) -> list[bm.TilePlan]:
    plans = []
    for start in range(0, len(positions), q_block):
        tile = positions[start:start + q_block]
        full, partial = [], []
        for b in range(-(-n_keys // kv_block)):
            # "full" means no mask needed for any key of the block's whole range (FlexAttention itself
            # masks keys past n_keys); "partial" means some existing key is visible to some query.
            block = range(b * kv_block, (b + 1) * kv_block)
            existing = range(b * kv_block, min((b + 1) * kv_block, n_keys))
            if all(key in bm.allowed_keys(p) for p in tile for key in block):
                full.append(b)
            elif any(key in bm.allowed_keys(p) for p in tile for key in existing):
                partial.append(b)
        plans.append(bm.TilePlan(full, partial))
    return plans


CASES = [
    ([0], 1),
    ([0, 1, 2, 3], 4),  # every token selected: full causal
    ([5, 9, 130, 131, 300], 301),
    ([127], 200),  # a tile ending exactly on a block boundary
    ([127, 128], 129),
    ([255, 256, 511], 600),
    (list(range(0, 1000, 7)), 1000),  # spread: several tiles at q_block 16
    (list(range(900, 1000)), 1000),  # clustered at the end
]


@pytest.mark.parametrize(("positions", "n_keys"), CASES)
@pytest.mark.parametrize(("q_block", "kv_block"), [(128, 128), (16, 32), (4, 8)])
def test_plan_matches_brute_force(positions: list[int], n_keys: int, q_block: int, kv_block: int) -> None:
    assert bm.plan_tiles(positions, q_block, kv_block) == brute_force_plan(positions, n_keys, q_block, kv_block)


def test_plan_random_selections() -> None:
    rng = random.Random(7)
    for _ in range(30):
        n = rng.randint(1, 700)
        k = rng.randint(1, n)
        positions = sorted(rng.sample(range(n), k))
        q_block, kv_block = rng.choice([(8, 16), (16, 8), (32, 32)])
        assert bm.plan_tiles(positions, q_block, kv_block) == brute_force_plan(positions, n, q_block, kv_block)


def test_partial_blocks_hold_each_query_own_position() -> None:
    """The key at a query's own position is visible to it: always in a full or partial block of its tile."""
    positions = [3, 40, 41, 200, 513]
    for start, plan in zip(range(0, len(positions), 2), bm.plan_tiles(positions, q_block=2, kv_block=16)):
        for p in positions[start:start + 2]:
            assert p // 16 in plan.full_blocks + plan.partial_blocks


def test_plan_rejects_unsorted_or_repeated_positions() -> None:
    with pytest.raises(ValueError):
        bm.plan_tiles([4, 2])
    with pytest.raises(ValueError):
        bm.plan_tiles([2, 2])


def test_bottom_right_mask_is_what_leaks() -> None:
    """The flaw being fixed: with k of N selected, bottom-right causal lets query i see keys up to N-k+i."""
    n, positions = 10, [1, 4]
    k = len(positions)
    for i, p in enumerate(positions):
        bottom_right = range(n - k + i + 1)
        assert set(bm.allowed_keys(p)) < set(bottom_right)  # strictly more keys than the true position allows


# --------------------------------------------------------------------------------------------------
# Torch (skipped where torch is absent, as in CI)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_keys", "k", "heads", "kv_heads"), [(300, 40, 4, 2), (257, 257, 2, 2), (130, 1, 2, 1),
                                                               (1000, 150, 3, 3)])
def test_flex_attention_matches_oracle(n_keys: int, k: int, heads: int, kv_heads: int) -> None:
    torch = pytest.importorskip("torch")
    pos = bm.spread_positions(n_keys, k, seed=n_keys)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(k, heads, 16, generator=g)
    key = torch.randn(n_keys, kv_heads, 16, generator=g)
    val = torch.randn(n_keys, kv_heads, 16, generator=g)
    mask = bm.build_block_mask(pos, n_keys, q_block=32, kv_block=32)
    got = bm.exact_attention(q, key, val, mask, scale=0.25)
    want = bm.reference_attention(q, key, val, pos, scale=0.25)
    assert torch.allclose(got, want, atol=1e-5)
    if k < n_keys:  # and the bottom-right mask LMCache uses is measurably different
        assert not torch.allclose(bm.bottom_right_attention(q, key, val, scale=0.25), want, atol=1e-3)


def test_block_mask_tensors_match_plan() -> None:
    torch = pytest.importorskip("torch")
    positions = [5, 9, 130, 131, 300, 301, 302, 640]
    mask = bm.build_block_mask(torch.tensor(positions), 700, q_block=4, kv_block=64)
    plans = bm.plan_tiles(positions, q_block=4, kv_block=64)
    full_n, full_i = mask.full_kv_num_blocks[0, 0], mask.full_kv_indices[0, 0]
    part_n, part_i = mask.kv_num_blocks[0, 0], mask.kv_indices[0, 0]
    for t, plan in enumerate(plans):
        assert full_i[t, :full_n[t]].tolist() == plan.full_blocks
        assert part_i[t, :part_n[t]].tolist() == plan.partial_blocks


def reference_paged_varlen(q: Any, k: Any, v: Any, max_seqlen_q: int, cu_seqlens_q: Any, max_seqlen_k: int,
                           seqused_k: Any, softmax_scale: float, causal: bool, block_table: Any,
                           return_softmax_lse: bool, fa_version: int | None = None) -> tuple[Any, Any]:
    """FlashAttention's paged varlen call, as vLLM documents it, in plain torch: an empty sequence gives
    zeros and an LSE of +inf (FA2's convention; FA3 writes -inf: the merge must take both)."""
    import torch

    assert not causal and return_softmax_lse
    heads = q.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((heads, q.shape[0]), float("inf"))
    page = k.shape[1]
    for b in range(len(cu_seqlens_q) - 1):
        lo, hi, n = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(seqused_k[b])
        assert n <= max_seqlen_k and hi - lo <= max_seqlen_q
        if n == 0 or hi == lo:
            continue
        keys = torch.cat([k[int(p)] for p in block_table[b][: -(-n // page)]])[:n]
        vals = torch.cat([v[int(p)] for p in block_table[b][: -(-n // page)]])[:n]
        rep = heads // keys.shape[1]
        keys, vals = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi], keys) * softmax_scale
        lse[:, lo:hi] = torch.logsumexp(scores, -1)
        out[lo:hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals)
    return out, lse


def block_sparse_flex(query: Any, key: Any, value: Any, block_mask: Any, scale: float, flex: Any = None) -> Any:
    """FlexAttention as its compiled kernels compute it (out and LSE, as kvdemo.blend_mask._flex returns them):
    only the listed blocks, mask_mod inside them.

    (Eager FlexAttention on CPU evaluates mask_mod everywhere and ignores the block lists, so it cannot
    check a band-only mask; the GPU check, python -m kvdemo.blend_mask --self-check, runs the real kernel.)"""
    import torch

    qb, kb = block_mask.BLOCK_SIZE
    blocks = block_mask.to_dense()[0, 0].bool()
    keep = blocks.repeat_interleave(qb, 0).repeat_interleave(kb, 1)[: query.shape[0], : key.shape[0]]
    qi = torch.arange(query.shape[0])[:, None]
    ki = torch.arange(key.shape[0])[None, :]
    keep &= block_mask.mask_mod(0, 0, qi, ki)
    rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", query, k) * scale
    scores = scores.masked_fill(~keep[None], float("-inf"))
    out_lse = torch.logsumexp(scores, -1)
    probs = torch.nan_to_num(torch.exp(scores - out_lse[..., None]))
    out = torch.einsum("hqk,khd->hqd", probs, v)[None]
    return out, out_lse[None]


@pytest.mark.parametrize("options", [{"fused_merge": False}, {"fused_merge": True}, {"one_region": True},
                                     {"one_region": True, "skip_guards": True}], ids=str)
@pytest.mark.parametrize(("n_keys", "k"), [(1000, 150), (700, 300), (300, 7), (129, 3), (2000, 127)])
def test_split_plan_matches_oracle(n_keys: int, k: int, options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """FlashAttention on fully visible blocks + FlexAttention on the band, merged (every variant of the split
    path, over two layers of one plan): the exact attention."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(bm, "_flex", block_sparse_flex)
    pos = bm.spread_positions(n_keys, k, seed=k)
    g = torch.Generator().manual_seed(3)
    q, key, val = (torch.randn(k, 4, 16, generator=g), torch.randn(n_keys, 2, 16, generator=g),
                   torch.randn(n_keys, 2, 16, generator=g))
    plan = bm.build_plan(pos, n_keys, split=True)
    assert plan.split
    want = bm.reference_attention(q, key, val, pos, 0.25)
    for _layer in range(2):  # skip_guards acts from a plan's second layer on
        got = bm.run_plan(q, key, val, plan, 0.25, reference_paged_varlen, **options)
        assert got.dtype == q.dtype and torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(bm.run_plan(q, key, val, bm.build_plan(pos, n_keys, split=False), 0.25), want, atol=1e-5)


def test_split_plan_needs_flash_attention_and_a_whole_block() -> None:
    torch = pytest.importorskip("torch")
    pos = torch.tensor([3, 50])
    assert not bm.build_plan(pos, 100, split=True).split  # under one 128-key block: FlexAttention alone
    with pytest.raises(ValueError):
        bm.run_plan(torch.zeros(2, 1, 4), torch.zeros(300, 1, 4), torch.zeros(300, 1, 4),
                    bm.build_plan(pos, 300, split=True), 1.0, None)


def test_merge_takes_empty_sides_of_either_sign() -> None:
    torch = pytest.importorskip("torch")
    a, b = torch.ones(2, 1, 3), torch.full((2, 1, 3), 5.0)
    for empty in (float("inf"), float("-inf")):
        lse_a = torch.tensor([[empty, 0.0]])
        lse_b = torch.tensor([[0.0, empty]])
        merged = bm.merge_by_lse(a, lse_a, b, lse_b)
        assert torch.equal(merged[0], b[0]) and torch.equal(merged[1], a[1])
    even = bm.merge_by_lse(a, torch.zeros(1, 2), b, torch.zeros(1, 2))
    assert torch.allclose(even, torch.full((2, 1, 3), 3.0))


def test_band_and_merge_traces_as_one_graph() -> None:
    """The one-region variant compiles without a graph break (fullgraph, dynamic shapes): Dynamo traced on CPU
    with the aot_eager backend (Inductor's CPU FlexAttention has no LSE), same result as eager."""
    torch = pytest.importorskip("torch")
    pos = bm.spread_positions(1000, 150, seed=1)
    g = torch.Generator().manual_seed(0)
    q, key, val = (torch.randn(150, 4, 16, generator=g), torch.randn(1000, 2, 16, generator=g),
                   torch.randn(1000, 2, 16, generator=g))
    plan = bm.build_plan(pos, 1000, split=True)
    pages = plan.n_pages * bm.KV_BLOCK
    full_out, full_lse = reference_paged_varlen(
        q=q, k=key[:pages].view(plan.n_pages, bm.KV_BLOCK, 2, 16), v=val[:pages].view(plan.n_pages, bm.KV_BLOCK, 2, 16),
        max_seqlen_q=bm.Q_BLOCK, cu_seqlens_q=plan.cu_seqlens_q, max_seqlen_k=pages, seqused_k=plan.seqused_k,
        softmax_scale=0.25, causal=False, block_table=plan.block_table, return_softmax_lse=True)
    compiled = torch.compile(bm.band_and_merge, dynamic=True, fullgraph=True, backend="aot_eager")
    want = bm.band_and_merge(q, key, val, plan.mask, 0.25, full_out, full_lse)
    assert torch.equal(compiled(q, key, val, plan.mask, 0.25, full_out, full_lse), want)
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        assert torch.equal(compiled(q, key, val, plan.mask, 0.25, full_out, full_lse), want)
