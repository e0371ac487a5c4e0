"""kvdemo.lmcache_patches.selection: the recompute policies as index arithmetic, and the plugin fix.

The policy tests run on lists (no torch); the tensor path is checked against them where torch is importable
(``pytest.importorskip``), as is the edited copy of LMCache's check-layer step against the original's code.
"""

from __future__ import annotations

import logging
import random
import sys
import types
from typing import Any

import pytest

from kvdemo import vllm_plugin as vp
from kvdemo.lmcache_patches import hooks, targets
from kvdemo.lmcache_patches import selection as sel
from kvdemo.lmcache_patches.selection import Policy

LMCACHE, EPIC4, FIRST4, PER_CHUNK = Policy("lmcache"), Policy("epic", 4), Policy("first", 4), Policy("per_chunk")
# [BOS]+sys at 0..5, SEP at 6-7, chunk 8..19, SEP at 20-21, chunk 22..29: LMCache's spans of this blend.
SPANS = [(0, 6), (8, 20), (22, 30)]


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(sel.ENV_POLICY, raising=False)
    sel.reset()
    yield
    sel.reset()


def _scores(n: int, seed: int = 0, ties: bool = False) -> list[float]:
    rng = random.Random(seed)
    return [float(rng.randrange(4)) if ties else rng.random() for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# The grammar
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    (None, None), ("", None), ("  ", None),
    ("lmcache", LMCACHE), ("epic:16", Policy("epic", 16)), (" EPIC:8 ", Policy("epic", 8)),
    ("first:32", Policy("first", 32)), ("per_chunk", PER_CHUNK), ("per-chunk", PER_CHUNK),
])
def test_parse_policy(text: str | None, expected: Policy | None) -> None:
    assert sel.parse_policy(text) == expected
    if expected is not None:
        assert sel.parse_policy(str(expected)) == expected  # str() writes the grammar back


@pytest.mark.parametrize("text", ["epic", "epic:0", "epic:x", "first:-1", "per_chunk:4", "topk", "lmcache:1"])
def test_parse_policy_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="epic:K"):
        sel.parse_policy(text)


def test_bad_env_means_lmcaches_selection(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(sel.ENV_POLICY, "epic")
    with caplog.at_level(logging.WARNING, logger=hooks.logger.name):
        assert sel.active_policy() is None
        assert sel.active_policy() is None
    assert len([r for r in caplog.records if sel.ENV_POLICY in r.getMessage()]) == 1
    monkeypatch.setenv(sel.ENV_POLICY, "epic:16")
    assert sel.active_policy() == Policy("epic", 16)


# --------------------------------------------------------------------------------------------------
# The selection on lists
# --------------------------------------------------------------------------------------------------


def test_lmcache_is_top_k_by_deviation_sorted_by_position() -> None:
    scores = [0.1, 5.0, 0.3, 4.0, 0.2, 3.0]
    assert sel.select_positions(LMCACHE, SPANS, scores, 3) == [1, 3, 5]
    assert sel.select_positions(LMCACHE, [], [1.0, 2.0, 2.0, 1.0], 2) == [1, 2]
    assert sel.select_positions(LMCACHE, [], [2.0, 1.0, 2.0, 2.0], 2) == [0, 2]  # ties: lower position
    assert sel.select_positions(LMCACHE, [], [1.0, 2.0], 5) == [0, 1]  # budget clipped to T


def test_epic_forces_each_chunks_first_tokens_then_fills_by_deviation() -> None:
    scores = [0.0] * 30
    scores[3], scores[25], scores[12] = 9.0, 8.0, 7.0  # 12 is among chunk 8..19's first four: no extra
    forced = [8, 9, 10, 11, 22, 23, 24, 25]  # not the prefix span at 0
    assert sel.select_positions(FIRST4, SPANS, scores, 1) == forced
    assert sel.select_positions(EPIC4, SPANS, scores, 10) == sorted(forced + [3, 12])
    assert sel.select_positions(EPIC4, SPANS, scores, 3) == forced  # over budget: |first| tokens, none dropped
    assert sel.select_positions(Policy("epic", 50), SPANS, scores, 2) == list(range(8, 20)) + list(range(22, 30))


def test_per_chunk_splits_the_budget_by_piece_length() -> None:
    """Pieces: SEP+chunk 6..19 (14 tokens) and 20..29 (10): 12 tokens split 7 + 5; the prefix gets none."""
    scores = [100.0] * 6 + [float(i) for i in range(6, 30)]  # the prefix deviates most
    picked = sel.select_positions(PER_CHUNK, SPANS, scores, 12)
    assert picked == list(range(13, 20)) + list(range(25, 30))
    assert sel.select_positions(LMCACHE, SPANS, scores, 12)[:6] == list(range(6))  # top-k takes the prefix
    assert sel.select_positions(PER_CHUNK, SPANS, scores, 26) == sorted([0, 1] + list(range(6, 30)))  # spill


def test_largest_remainder_shares() -> None:
    assert sel.largest_remainder([14, 10], 12) == [7, 5]
    assert sel.largest_remainder([1, 1, 1], 2) == [1, 1, 0]  # ties to the earlier piece
    assert sel.largest_remainder([5, 3, 2], 7) == [4, 2, 1]  # 3.5, 2.1, 1.4: floors 3+2+1, one more to 3.5
    assert sel.largest_remainder([4, 0], 3) == [3, 0] and sel.largest_remainder([], 3) == []
    for seed in range(50):
        rng = random.Random(seed)
        lengths = [rng.randrange(0, 40) for _ in range(rng.randrange(1, 8))]
        budget = rng.randrange(0, sum(lengths) + 1)
        shares = sel.largest_remainder(lengths, budget)
        assert sum(shares) == (budget if sum(lengths) else 0)
        assert all(0 <= c <= n for c, n in zip(shares, lengths))


def test_spans_outside_or_overlapping() -> None:
    assert sel.normalize_spans([(22, 40), (0, 6), (8, 8)], 30) == [(0, 6), (22, 30)]
    with pytest.raises(ValueError):
        sel.normalize_spans([(0, 10), (5, 12)], 30)
    connector = types.SimpleNamespace(_kvdemo_spans=((0, 6), (8, 20), (22, 30)))
    assert sel.blend_spans(connector, 30) == SPANS
    assert sel.blend_spans(connector, 29) is None  # a record of another load
    assert sel.blend_spans(types.SimpleNamespace(), 30) is None


@pytest.mark.parametrize("seed", range(30))
def test_properties_of_every_policy(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randrange(1, 120)
    spans, pos = [], rng.choice([0, 2])
    while pos < n:
        end = min(n, pos + rng.randrange(1, 30))
        spans.append((pos, end))
        pos = end + rng.randrange(0, 3)
    scores = _scores(n, seed, ties=seed % 2 == 0)
    budget = rng.randrange(0, n + 1)
    inside = {i for s, e in spans for i in range(s, e)}
    for policy in (LMCACHE, PER_CHUNK, Policy("epic", rng.randrange(1, 9)), Policy("first", rng.randrange(1, 9))):
        picked = sel.select_positions(policy, spans, scores, budget)
        assert picked == sorted(set(picked)) and all(0 <= i < n for i in picked)
        forced = [i for s, e in spans if s > 0 for i in range(s, min(e, s + policy.k))]
        if policy.kind in ("lmcache", "per_chunk"):
            assert len(picked) == budget
        elif policy.kind == "epic":
            assert len(picked) == max(budget, len(forced)) and set(forced) <= set(picked)
        else:
            assert picked == forced and set(picked) <= inside


# --------------------------------------------------------------------------------------------------
# The tensor path equals the list path
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_tensor_path_equals_list_path(seed: int) -> None:
    torch = pytest.importorskip("torch")
    rng = random.Random(seed)
    n = rng.randrange(1, 300)
    cuts = sorted(rng.sample(range(1, n + 1), min(n, rng.randrange(1, 12))))
    spans = [(a + (2 if i else 0), b) for i, (a, b) in enumerate(zip([0] + cuts[:-1], cuts))]
    scores = _scores(n, seed, ties=seed % 3 == 0)
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.tensor(scores, dtype=dtype)
        as_list = t.float().tolist()  # the values the tensor holds
        for policy in (LMCACHE, PER_CHUNK, Policy("epic", 1 + seed % 9), Policy("first", 3)):
            for budget in (0, 1, rng.randrange(0, n + 1), n):
                got = sel.select_tensor(policy, spans, t, budget)
                assert got.dtype == torch.int64 and got.device == t.device
                assert got.tolist() == sel.select_positions(policy, spans, as_list, budget), (policy, budget)


def test_tensor_lmcache_matches_torch_topk_on_distinct_scores() -> None:
    torch = pytest.importorskip("torch")
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    ref = torch.sort(torch.topk(scores, k=150).indices).values
    assert torch.equal(sel.select_tensor(LMCACHE, SPANS, scores, 150), ref)


def test_tensor_path_leaves_the_scores_alone() -> None:
    torch = pytest.importorskip("torch")
    scores = torch.rand(30)
    before = scores.clone()
    sel.select_tensor(EPIC4, SPANS, scores, 10)
    sel.select_tensor(PER_CHUNK, SPANS, scores, 10)
    assert torch.equal(scores, before)


# --------------------------------------------------------------------------------------------------
# The plugin fix on fake LMCache modules
# --------------------------------------------------------------------------------------------------


class FakeAttnMetadata:
    def __init__(self) -> None:
        self.updates: list[Any] = []

    def update_from_top_indices(self, top_indices: Any) -> None:
        self.updates.append(top_indices)


def lmcache_process_qkv(self: Any, q: Any, k: Any, v: Any, residual: Any, layer_id: int, attn_output: Any,
                        attn_metadata: Any) -> Any:
    """lmcache 0.5.3 blend/blender.py ``LMCBlender.process_qkv``, its logging left out."""
    import torch

    old_k, old_v = self.gpu_connector.get_kv(layer_id)
    if attn_output is None:
        attn_output = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if self.metadata.positions is None:
        self.metadata.positions = torch.arange(q.shape[0], device=q.device, dtype=torch.int64)
    layer = self.layerwise_model.vllm_model.model.layers[layer_id]
    attn_layer = layer.self_attn
    q, k = attn_layer.rotary_emb(self.metadata.positions, q, k)
    if layer_id in self.common_metadata.check_layers:
        diff_k = torch.sum((k.to(torch.float32) - old_k.to(torch.float32)) ** 2, dim=[1])
        total_len = diff_k.shape[0]
        topk_num = int(total_len * self.common_metadata.recomp_ratios[0])
        topk_num = max(topk_num, 1)
        top_indices = torch.topk(diff_k, k=topk_num).indices
        top_indices, _ = torch.sort(top_indices)
        k, v = k[top_indices], v[top_indices]
        q = q[top_indices]
        residual = residual[top_indices]
        self.metadata.imp_indices = top_indices
        self.metadata.positions = self.metadata.positions[top_indices]
        attn_output = attn_output[:topk_num]
        attn_metadata.update_from_top_indices(top_indices)
    if self.metadata.imp_indices is not None:
        old_k[self.metadata.imp_indices] = k
        old_v[self.metadata.imp_indices] = v
        return q, old_k, old_v, residual, attn_output, attn_metadata
    return q, k, v, residual, attn_output, attn_metadata


def _blender_class() -> tuple[type, type]:
    """An LMCBlender with the parts process_qkv touches: a connector holding the loaded KV, a rotary that
    adds the position to q and k, one check layer and a ratio."""
    class Connector:
        def __init__(self, old: dict[int, tuple[Any, Any]]) -> None:
            self.old = old

        def get_kv(self, layer_id: int) -> tuple[Any, Any]:
            return self.old[layer_id]

        def batched_to_gpu(self, starts: list[int], ends: list[int], **kwargs: Any) -> Any:
            yield "loaded"

    def rotary_emb(positions: Any, q: Any, k: Any) -> tuple[Any, Any]:
        return q + positions[:, None], k + positions[:, None]

    class LMCBlender:
        def __init__(self, old: dict[int, tuple[Any, Any]], ratio: float, check: int = 1) -> None:
            self.gpu_connector = Connector(old)
            attn = types.SimpleNamespace(self_attn=types.SimpleNamespace(rotary_emb=rotary_emb))
            self.layerwise_model = types.SimpleNamespace(
                vllm_model=types.SimpleNamespace(model=types.SimpleNamespace(layers=[attn] * 4)))
            self.common_metadata = types.SimpleNamespace(check_layers=[check], recomp_ratios=[ratio])
            self.metadata = types.SimpleNamespace(imp_indices=None, positions=None)

    LMCBlender.process_qkv = lmcache_process_qkv
    return LMCBlender, Connector


def _patched_modules(monkeypatch: pytest.MonkeyPatch, torch: Any = None) -> types.SimpleNamespace:
    blender_cls, connector_cls = _blender_class()
    for pkg in ("lmcache", "lmcache.v1", "lmcache.v1.compute", "lmcache.v1.compute.blend", "lmcache.v1.gpu_connector"):
        monkeypatch.setitem(sys.modules, pkg, types.ModuleType(pkg))
    blender = types.ModuleType(targets.MOD_BLENDER)
    blender.LMCBlender, blender.torch = blender_cls, torch
    connectors = types.ModuleType(targets.MOD_GPU_CONNECTORS)
    connectors.VLLMBufferLayerwiseGPUConnector = connector_cls
    monkeypatch.setitem(sys.modules, targets.MOD_BLENDER, blender)
    monkeypatch.setitem(sys.modules, targets.MOD_GPU_CONNECTORS, connectors)
    monkeypatch.setattr(hooks, "lmcache_version", lambda: "0.5.3")
    return types.SimpleNamespace(blender=blender_cls, connector=connector_cls)


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(vp.ENV_ENABLE, "1")
    monkeypatch.delenv(vp.ENV_FIXES, raising=False)
    vp._reset_for_tests()
    yield monkeypatch
    vp._reset_for_tests()


def test_fix_is_in_the_table_and_can_be_removed() -> None:
    assert vp.FIXES["selection"] == sel.PATCHES
    assert "selection" in vp.parse_fixes("all") and "selection" not in vp.parse_fixes("all,-selection")
    assert vp.ALL_FIXES.index("selection") > vp.ALL_FIXES.index("sync")  # it wraps what sync replaces
    assert "selection" in (vp.__doc__ or "")


def test_register_wraps_both_targets_and_all_minus_selection_does_not(plugin: pytest.MonkeyPatch) -> None:
    fakes = _patched_modules(plugin)
    original = fakes.blender.process_qkv
    vp.register()
    assert hooks.already(fakes.blender.process_qkv, "selection")
    assert hooks.already(fakes.connector.batched_to_gpu, "selection")
    assert fakes.blender.process_qkv.__wrapped__ is original

    vp._reset_for_tests()
    fakes = _patched_modules(plugin)
    plugin.setenv(vp.ENV_FIXES, "all,-selection")
    vp.register()
    assert not hooks.already(fakes.blender.process_qkv, "selection")
    assert not hooks.already(fakes.connector.batched_to_gpu, "selection")


def test_other_lmcache_versions_get_no_policy(plugin: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fakes = _patched_modules(plugin)
    plugin.setattr(hooks, "lmcache_version", lambda: "0.5.6")
    plugin.setenv(vp.ENV_FIXES, "selection")
    with caplog.at_level(logging.INFO, logger=hooks.logger.name):
        vp.register()
    assert not hooks.already(fakes.blender.process_qkv, "selection")
    assert any(r.levelno == logging.WARNING and "'selection'" in r.getMessage() for r in caplog.records)


def test_connector_keeps_the_spans_and_returns_the_originals_generator(plugin: pytest.MonkeyPatch) -> None:
    fakes = _patched_modules(plugin)
    plugin.setenv(vp.ENV_FIXES, "selection")
    vp.register()
    connector = fakes.connector({})
    gen = connector.batched_to_gpu([0, 8, 22], [6, 20, 30], slot_mapping="s")
    assert next(gen) == "loaded"
    assert connector._kvdemo_spans == ((0, 6), (8, 20), (22, 30))


def test_no_policy_returns_the_originals_result(plugin: pytest.MonkeyPatch) -> None:
    """Without torch: the wrap hands every call to the original, whatever it returns."""
    fakes = _patched_modules(plugin)
    calls = []

    def original(self: Any, *args: Any) -> Any:
        calls.append(args)
        return ("original", args)

    fakes.blender.process_qkv = original
    plugin.setenv(vp.ENV_FIXES, "selection")
    vp.register()
    blender = fakes.blender({}, 0.5)
    for policy in ("", "lmcache"):
        plugin.setenv(sel.ENV_POLICY, policy)
        assert blender.process_qkv("q", "k", "v", "r", 1, None, "meta") == ("original", ("q", "k", "v", "r", 1, None,
                                                                                          "meta"))
    assert len(calls) == 2


def _qkv(torch: Any, n: int, seed: int) -> tuple[Any, ...]:
    """q, k, v, residual of n tokens and the loaded (old) K, V of 4 layers."""
    g = torch.Generator().manual_seed(seed)
    q, residual = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    k, v = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    old = {i: (torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)) for i in range(4)}
    return q, k, v, residual, old


def _run_layers(blender: Any, q: Any, k: Any, v: Any, residual: Any) -> list[Any]:
    out, meta = [], FakeAttnMetadata()
    for layer_id in range(3):
        result = blender.process_qkv(q.clone(), k.clone(), v.clone(), residual.clone(), layer_id, None, meta)
        out.append([*result[:4], result[4].shape])  # attn_output: torch.empty, its shape only
        idx = blender.metadata.imp_indices
        if idx is not None and q.shape[0] > idx.shape[0]:  # later layers compute only the picked tokens
            q, k, v, residual = q[idx], k[idx], v[idx], residual[idx]
    return out + [meta.updates]


def test_check_layer_copy_with_lmcaches_rule_is_lmcaches_code(plugin: pytest.MonkeyPatch) -> None:
    """The edited copy with the lmcache policy's top-k gives what LMCache's process_qkv gives, layer by layer."""
    torch = pytest.importorskip("torch")
    fakes = _patched_modules(plugin, torch)
    n = 30
    q, k, v, residual, old = _qkv(torch, n, 0)

    def fresh_old() -> dict[int, tuple[Any, Any]]:
        return {i: (a.clone(), b.clone()) for i, (a, b) in old.items()}

    ref = _run_layers(fakes.blender(fresh_old(), 0.3), q, k, v, residual)

    def copy_with_lmcache_rule(self: Any, q: Any, k: Any, v: Any, residual: Any, layer_id: int, attn_output: Any,
                               attn_metadata: Any) -> Any:
        if layer_id in self.common_metadata.check_layers and self.metadata.imp_indices is None:
            return sel.check_layer_step(self, torch, LMCACHE, SPANS, q, k, v, residual, layer_id, attn_output,
                                        attn_metadata)
        return lmcache_process_qkv(self, q, k, v, residual, layer_id, attn_output, attn_metadata)

    ours = _run_layers(type("B", (fakes.blender,), {"process_qkv": copy_with_lmcache_rule})(fresh_old(), 0.3),
                       q, k, v, residual)
    _assert_same(torch, ref, ours)


def _assert_same(torch: Any, a: Any, b: Any) -> None:
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(torch, x, y)
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("policy", ["epic:3", "per_chunk", "first:2"])
def test_policy_picks_by_the_spans_of_the_load(plugin: pytest.MonkeyPatch, policy: str) -> None:
    torch = pytest.importorskip("torch")
    fakes = _patched_modules(plugin, torch)
    plugin.setenv(vp.ENV_FIXES, "selection")
    plugin.setenv(sel.ENV_POLICY, policy)
    vp.register()
    n = 30
    q, k, v, residual, old = _qkv(torch, n, 1)
    blender = fakes.blender(old, 0.2)
    list(blender.gpu_connector.batched_to_gpu([0, 8, 22], [6, 20, 30]))
    positions = torch.arange(n)
    deviation = ((k + positions[:, None] - old[1][0]) ** 2).sum(dim=1)  # the fake rotary adds the position
    want = sel.select_positions(sel.parse_policy(policy), SPANS, deviation.tolist(), max(int(n * 0.2), 1))
    meta = FakeAttnMetadata()
    layer0 = blender.process_qkv(q, k, v, residual, 0, None, meta)
    assert layer0[0].shape[0] == n and blender.metadata.imp_indices is None
    q1, k1, _, r1, out1, _ = blender.process_qkv(q, k, v, residual, 1, None, meta)
    assert blender.metadata.imp_indices.tolist() == want and [u.tolist() for u in meta.updates] == [want]
    assert q1.shape[0] == r1.shape[0] == out1.shape[0] == len(want) and k1.shape[0] == n
    assert torch.equal(k1[want], (k + positions[:, None])[want])  # the picked rows get the fresh K
    assert blender.metadata.positions.tolist() == want
    idx = blender.metadata.imp_indices
    layer2 = blender.process_qkv(q[idx], k[idx], v[idx], residual[idx], 2, None, meta)  # the original's path
    assert layer2[0].shape[0] == len(want) and len(meta.updates) == 1


def test_policy_without_spans_keeps_lmcaches_selection(plugin: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    torch = pytest.importorskip("torch")
    fakes = _patched_modules(plugin, torch)
    plugin.setenv(vp.ENV_FIXES, "selection")
    plugin.setenv(sel.ENV_POLICY, "epic:4")
    vp.register()
    q, k, v, residual, old = _qkv(torch, 30, 2)
    ref = lmcache_process_qkv(fakes.blender({i: (a.clone(), b.clone()) for i, (a, b) in old.items()}, 0.2),
                              q, k, v, residual, 1, None, FakeAttnMetadata())
    with caplog.at_level(logging.WARNING, logger=hooks.logger.name):
        ours = fakes.blender(old, 0.2).process_qkv(q, k, v, residual, 1, None, FakeAttnMetadata())
    _assert_same(torch, list(ref[:4]), list(ours[:4]))
    assert ref[4].shape == ours[4].shape
    assert any("no segment spans" in r.getMessage() for r in caplog.records)


def test_spans_are_kept_over_the_sync_fixs_copy(plugin: pytest.MonkeyPatch) -> None:
    """'sync' replaces batched_to_gpu without calling the method it found; 'selection' is armed after it."""
    fakes = _patched_modules(plugin)
    module = sys.modules[targets.MOD_GPU_CONNECTORS]
    module.__dict__.update(torch=object(), lmc_ops=object(), MemoryFormat=object(), LMCBlenderBuilder=object(),
                           logger=logging.getLogger("x"))
    plugin.setenv(vp.ENV_FIXES, "selection,sync")
    vp.register()
    method = fakes.connector.batched_to_gpu
    assert getattr(method, hooks.MARK) == "selection" and {"sync", "selection"} <= getattr(method, hooks.MARKS)
    connector = fakes.connector({})
    method(connector, [0, 8], [6, 20])  # a generator: nothing of the sync copy runs before next()
    assert connector._kvdemo_spans == ((0, 6), (8, 20))
