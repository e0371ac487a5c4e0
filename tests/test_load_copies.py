"""Fix 'loadcopy': the layerwise load with per-request views and byte-slice copies writes the same paged KV, bit
for bit, as the sync fix's copy of LMCache's per-segment loop; odd memory objects take LMCache's loop.

Real CPU tensors (torch only), a stand-in for the CUDA stream API, memory objects with lmcache 0.5.3
TensorMemoryObj's ``metadata``/``tensor``/``get_size`` semantics."""

from __future__ import annotations

import contextlib
import logging
import threading
import types
from typing import Any

import pytest

from kvdemo.lmcache_patches import layerwise_sync, load_copies

torch = pytest.importorskip("torch")

LAYERS, HIDDEN, BF16 = 6, 64, torch.bfloat16
LENS = [5, 37, 40, 33]  # segments, separators (3 tokens) between them
STARTS = [1 + sum(n + 3 for n in LENS[:i]) for i in range(len(LENS))]
ENDS = [s + n for s, n in zip(STARTS, LENS)]
TOKENS = ENDS[-1] - STARTS[0]
SLOTS = 4 * TOKENS


class _Stream:
    def wait_event(self, event: Any) -> None: ...
    def wait_stream(self, stream: Any) -> None: ...
    def synchronize(self) -> None: ...


class _Cuda:
    current = _Stream()

    def current_stream(self) -> _Stream:
        return self.current

    @contextlib.contextmanager
    def stream(self, stream: Any):
        yield

    def Event(self) -> Any:  # torch.cuda.Event
        return types.SimpleNamespace(record=lambda stream=None: None)


class _Torch:
    cuda = _Cuda()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class MemoryObj:
    """lmcache 0.5.3 TensorMemoryObj's metadata / tensor / get_size, as they behave there."""

    def __init__(self, raw: Any, shape: tuple, dtype: Any, positions: Any = None) -> None:
        self.raw_data, self.valid, self._used_size_override = raw, True, None
        self.lock = threading.Lock()
        self.meta = types.SimpleNamespace(fmt="KV_2TD", dtype=dtype, shape=torch.Size(shape),
                                          cached_positions=positions)
        self.group_prefix_sum = [0, torch.Size(shape).numel() * dtype.itemsize]

    def get_size(self) -> int:
        return self.group_prefix_sum[-1] if self._used_size_override is None else self._used_size_override

    @property
    def metadata(self) -> Any:
        with self.lock:
            return self.meta

    @property
    def tensor(self) -> Any:
        if not self.valid:
            return None
        if self._used_size_override is not None:
            return self.raw_data[:self._used_size_override].view(torch.uint8)
        return self.raw_data[:self.get_size()].view(self.meta.dtype).view(self.meta.shape)

    def ref_count_down(self) -> None: ...


def _rope(old: Any, new: Any, k: Any) -> Any:
    """In place and position dependent, returning a view (as LMCache's fused RoPE does)."""
    heads = k.view(k.shape[0], -1, 16)
    heads.mul_(-1).add_((new - old).to(k.dtype).view(-1, 1, 1) * 0.125)
    return heads.view(k.shape[0], -1)


class _Connector:
    def __init__(self) -> None:
        self.num_layers, self.cache_positions, self.fused_rotary_emb = LAYERS, True, _rope
        self.load_stream, self.buffer_mapping, self.dtype, self.engine_kv_format = _Stream(), {}, BF16, "flash"
        self.current_gap_positions = None
        self.kvcaches = [torch.zeros(2, SLOTS, HIDDEN, dtype=BF16) for _ in range(LAYERS)]
        self.gpu_buffer_allocator = types.SimpleNamespace(allocate=lambda shape, dtype, fmt: MemoryObj(
            torch.full((torch.Size(shape).numel() * 2,), 7, dtype=torch.uint8), shape, dtype))

    def initialize_kvcaches_ptr(self, **kwargs: Any) -> None: ...
    def _lazy_initialize_buffer(self, kv_caches: Any) -> None: ...

    def get_shape(self, num_tokens: int) -> tuple:
        return (2, num_tokens, HIDDEN)


def _module() -> Any:
    def transfer(buf: Any, paged: Any, slots: Any, direction: Any, fmt: Any, token_major: bool = False) -> None:
        paged[:, slots] = buf

    return types.SimpleNamespace(
        torch=_Torch(), MemoryFormat=types.SimpleNamespace(KV_2TD="KV_2TD"), LMCBlenderBuilder=None,
        lmc_ops=types.SimpleNamespace(TransferDirection=types.SimpleNamespace(H2D="H2D"),
                                      single_layer_kv_transfer=transfer),
        logger=logging.getLogger("fake-lmcache"))


def _memory_objects(seed: int, fp16_at: tuple[int, int] | None = None) -> list[list[MemoryObj]]:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for layer in range(LAYERS):
        row = []
        for j, n in enumerate(LENS):
            dtype = torch.float16 if (layer, j) == fp16_at else BF16
            size = 2 * n * HIDDEN * 2
            raw = torch.randint(0, 256, (size + 66,), dtype=torch.uint8, generator=g)[2:]  # aligned, offset 2
            obj = MemoryObj(raw[:size + 64], (2, n, HIDDEN), dtype, torch.arange(n) + 100 * j)
            if dtype == torch.float16:  # finite values: LMCache's fp16 -> bf16 cast is deterministic
                obj.raw_data[:size].view(torch.float16).copy_(torch.randn(2 * n * HIDDEN, generator=g).half())
            row.append(obj)
        layers.append(row)
    return layers


def _drive(reuse_views: bool, objs: list[list[MemoryObj]]) -> list[Any]:
    """retrieve_layer + the blender, as they drive batched_to_gpu; returns the paged caches."""
    connector = _Connector()
    slots = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(3))[:ENDS[-1] + 2]
    load = layerwise_sync.make_batched_to_gpu(_module(), reuse_views=reuse_views)(connector, STARTS, ENDS,
                                                                                   slot_mapping=slots)
    next(load)
    for layer in range(LAYERS):
        load.send(objs[layer])
        k = connector.buffer_mapping[layer].tensor[0]
        k[::7] = k[::7] * 0.5  # the blender writes recomputed K rows into the buffer
    with pytest.raises(StopIteration):
        next(load)
        next(load)
    return connector.kvcaches


@pytest.mark.parametrize("fp16_at", [None, (3, 2)], ids=["bf16", "an-fp16-object-in-layer-3"])
def test_paged_kv_is_byte_identical_to_the_sync_copy(fp16_at: tuple[int, int] | None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    objs = _memory_objects(11, fp16_at)
    taken: list[bool] = []
    source_bytes = load_copies.source_bytes

    def recorded(*args: Any) -> Any:
        result = source_bytes(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(load_copies, "source_bytes", recorded)
    want, got = _drive(False, objs), _drive(True, objs)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(want, got))
    # the byte-slice copies from layer 1 on; a layer with an fp16 object goes through LMCache's loop (a cast)
    assert taken == [fp16_at is None or layer != fp16_at[0] for layer in range(1, LAYERS)]


def _views() -> load_copies.BufferViews:
    buffer = MemoryObj(torch.zeros(2 * TOKENS * HIDDEN * 2, dtype=torch.uint8), (2, TOKENS, HIDDEN), BF16)
    return load_copies.BufferViews(torch, buffer, [(s - STARTS[0], e - STARTS[0]) for s, e in zip(STARTS, ENDS)])


@pytest.mark.parametrize("edit", [
    lambda o: setattr(o.meta, "dtype", torch.float16),
    lambda o: setattr(o.meta, "shape", torch.Size((2, LENS[1] - 1, HIDDEN))),
    lambda o: setattr(o, "_used_size_override", 8),
    lambda o: setattr(o, "valid", False),
    lambda o: setattr(o.meta, "fmt", "KV_T2D"),
    lambda o: setattr(o, "raw_data", torch.zeros(10**6, dtype=torch.uint8)[1:]),  # odd byte offset
    lambda o: setattr(o, "raw_data", torch.zeros(10**6, dtype=torch.uint8)[::2]),  # strided
    lambda o: setattr(o, "raw_data", o.raw_data[:100]),  # short
    lambda o: setattr(o, "raw_data", o.raw_data.view(BF16)),  # not bytes
], ids=["dtype", "shape", "size-override", "invalid", "format", "offset", "strided", "short", "bf16-raw"])
def test_any_odd_object_sends_the_layer_to_lmcaches_loop(edit: Any) -> None:
    row, views = _memory_objects(5)[1], _views()
    assert load_copies.source_bytes(torch, row, views, "KV_2TD") is not None
    odd = MemoryObj(row[1].raw_data, (2, LENS[1], HIDDEN), BF16)
    edit(odd)
    assert load_copies.source_bytes(torch, [row[0], odd, *row[2:]], views, "KV_2TD") is None
    assert load_copies.source_bytes(torch, row[:-1], views, "KV_2TD") is None  # one object missing

