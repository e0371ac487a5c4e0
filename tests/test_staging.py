"""The plugin's fix 'staging': runs of stored chunks go to the GPU as DMA copies into one staged block, then
one scatter per run.

Refusals run on fakes (no torch). The copy, the read-back check and the fallback run with real CPU torch
tensors (skipped without torch): ``torch.cuda.stream`` becomes a no-op context and ``is_pinned`` True (a
CPU-only torch cannot pin); everything else is the real code path, against a miniature of LMCache's paged
connector whose ``to_gpu``/``from_gpu`` scatter and gather by slot as LMCache's kernel does.
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Any

import pytest

from kvdemo import vllm_plugin as vp
from kvdemo.lmcache_patches import hooks, staging


@pytest.fixture(autouse=True)
def _fresh_plugin():
    vp._reset_for_tests()
    yield
    vp._reset_for_tests()


@pytest.mark.parametrize(("starts", "ends", "runs"), [
    ([0, 256, 512], [256, 512, 700], [(0, 3)]),
    ([0, 256, 1024], [256, 512, 1280], [(0, 2), (2, 3)]),  # a gap: two runs
    (list(range(0, 2560, 256)), list(range(256, 2816, 256)), [(0, 8), (8, 10)]),  # at most 8 chunks a run
    ([0], [100], [(0, 1)]),
])
def test_consecutive_runs(starts: list[int], ends: list[int], runs: list[tuple[int, int]]) -> None:
    assert staging.consecutive_runs(starts, ends) == runs


def test_staging_is_armed_by_default() -> None:
    assert "staging" in vp.parse_fixes(None) and "staging" not in vp.parse_fixes("all,-staging")


# ----- staging: refusals (no torch) ------------------------------------------------------------------


class FakeTensor:
    def __init__(self, cuda: bool = False, contiguous: bool = True, pinned: bool = True) -> None:
        self.is_cuda, self._contiguous, self._pinned = cuda, contiguous, pinned

    def is_contiguous(self) -> bool:
        return self._contiguous

    def is_pinned(self) -> bool:
        return self._pinned


@pytest.mark.parametrize(("tensor", "reason"), [
    (FakeTensor(), None),
    (FakeTensor(pinned=False), "pinned"),
    (FakeTensor(contiguous=False), "contiguous"),
    (FakeTensor(cuda=True), "host tensor"),
])
def test_staging_refuses_what_it_cannot_copy_asynchronously(tensor: FakeTensor, reason: str | None) -> None:
    connector = types.SimpleNamespace(use_mla=False)
    got = staging.staging_refusal(connector, [types.SimpleNamespace(tensor=FakeTensor()),
                                              types.SimpleNamespace(tensor=tensor)])
    assert (got is None) if reason is None else (reason in got)
    assert "MLA" in staging.staging_refusal(types.SimpleNamespace(use_mla=True), [])


def test_staging_refusal_takes_lmcaches_path(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(hooks, "lmcache_version", lambda: "0.5.3")
    calls: list[str] = []

    class Connector:
        use_mla = False

        def batched_to_gpu(self, memory_objs, starts, ends, **kwargs):
            calls.append("lmcache")

    module = types.SimpleNamespace(__name__="lmcache.v1.gpu_connector.gpu_connectors",
                                   VLLMPagedMemGPUConnectorV2=Connector)
    staging.patch_staged_load(module)
    with caplog.at_level(logging.INFO, logger=hooks.logger.name):
        Connector().batched_to_gpu([types.SimpleNamespace(tensor=FakeTensor(pinned=False))], [0], [256])
    assert calls == ["lmcache"]
    assert any("outside pinned memory" in r.getMessage() for r in caplog.records)


def test_staging_needs_the_copied_lmcache_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks, "lmcache_version", lambda: "0.6.0")

    class Connector:
        def batched_to_gpu(self, memory_objs, starts, ends, **kwargs):
            return "lmcache"

    original = Connector.batched_to_gpu
    staging.patch_staged_load(types.SimpleNamespace(__name__="m", VLLMPagedMemGPUConnectorV2=Connector))
    assert Connector.batched_to_gpu is original


# ----- staging: the copy path with real (CPU) torch tensors ----------------------------------------


class PagedConnector:
    """LMCache's VLLMPagedMemGPUConnectorV2 in miniature: to_gpu scatters a [2, L, T, D] chunk into a paged
    cache by slot, from_gpu gathers it back; ``corrupt`` makes to_gpu write wrong values (a broken copy)."""

    use_mla = False

    def __init__(self, torch: Any, slots: int = 64, layers: int = 2, dim: int = 4, corrupt: bool = False) -> None:
        self.torch, self.corrupt = torch, corrupt
        self.cache = torch.zeros(2, layers, slots, dim)
        self.kvcaches = [self.cache]
        self.load_stream = self.store_stream = types.SimpleNamespace(synchronize=lambda: None)
        self.lmcache_loads = 0

    def initialize_kvcaches_ptr(self, **kwargs: Any) -> None:
        pass

    def to_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        slots = kwargs["slot_mapping"][start:end]
        skip = min(end - start, max(0, kwargs.get("vllm_cached_tokens", 0) - start))
        values = memory_obj.tensor + (1 if self.corrupt else 0)
        self.cache[:, :, slots[skip:]] = values[:, :, skip:]

    def from_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        memory_obj.tensor.copy_(self.cache[:, :, kwargs["slot_mapping"][start:end]])

    def batched_to_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> None:
        self.lmcache_loads += 1
        for obj, start, end in zip(memory_objs, starts, ends):
            self.to_gpu(obj, start, end, **kwargs)


@pytest.fixture
def staged(monkeypatch: pytest.MonkeyPatch) -> Any:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(hooks, "lmcache_version", lambda: "0.5.3")
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)  # CPU-only torch cannot pin
    module = types.SimpleNamespace(__name__="lmcache.v1.gpu_connector.gpu_connectors",
                                   VLLMPagedMemGPUConnectorV2=type("C", (PagedConnector,), {}))
    staging.patch_staged_load(module)
    return torch, module.VLLMPagedMemGPUConnectorV2


def _chunks(torch: Any, sizes: list[int], layers: int = 2, dim: int = 4) -> list[Any]:
    meta = types.SimpleNamespace(fmt="KV_2LTD")
    return [types.SimpleNamespace(tensor=torch.randn(2, layers, n, dim), metadata=meta) for n in sizes]


def test_staging_loads_every_chunk_where_lmcache_would(staged: Any, caplog: pytest.LogCaptureFixture) -> None:
    torch, cls = staged
    objs = _chunks(torch, [16, 16, 7])  # the last chunk is partial: a smaller view of the staging buffer
    slots = torch.randperm(64)[:39]
    starts, ends = [0, 16, 32], [16, 32, 39]
    staged_conn, reference = cls(torch), PagedConnector(torch)
    with caplog.at_level(logging.INFO, logger=hooks.logger.name):
        staged_conn.batched_to_gpu(objs, starts, ends, slot_mapping=slots, vllm_cached_tokens=3)
    reference.batched_to_gpu(objs, starts, ends, slot_mapping=slots, vllm_cached_tokens=3)
    assert torch.equal(staged_conn.cache, reference.cache)
    assert staged_conn.lmcache_loads == 0  # the wrapper did the load, not LMCache's batched_to_gpu
    assert any("reads back from vLLM's KV cache equal" in r.getMessage() for r in caplog.records)
    assert getattr(staged_conn, staging.BUFFER_ATTR).numel() == 2 * 2 * 39 * 4  # one block for the run of 3


def test_staging_that_reads_back_wrong_falls_back_for_good(staged: Any, caplog: pytest.LogCaptureFixture) -> None:
    torch, cls = staged
    objs = _chunks(torch, [16])
    slots = torch.arange(16)
    conn = cls(torch, corrupt=True)
    with caplog.at_level(logging.WARNING, logger=hooks.logger.name):
        conn.batched_to_gpu(objs, [0], [16], slot_mapping=slots)
    assert conn.lmcache_loads == 1 and getattr(conn, staging.DISABLED_ATTR)
    assert any("differ from the stored chunks" in r.getMessage() for r in caplog.records)
    conn.batched_to_gpu(objs, [0], [16], slot_mapping=slots)
    assert conn.lmcache_loads == 2  # stays on LMCache's path


def test_staging_keeps_separate_runs_where_chunks_do_not_follow(staged: Any) -> None:
    torch, cls = staged
    objs = _chunks(torch, [16, 16])
    slots = torch.randperm(64)[:48]
    staged_conn, reference = cls(torch), PagedConnector(torch)
    staged_conn.batched_to_gpu(objs, [0, 32], [16, 48], slot_mapping=slots)
    reference.batched_to_gpu(objs, [0, 32], [16, 48], slot_mapping=slots)
    assert torch.equal(staged_conn.cache, reference.cache) and staged_conn.lmcache_loads == 0
