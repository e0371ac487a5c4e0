"""The plugin's copy of LMCache's layerwise loader must let each layer's load overlap the previous compute.

No GPU here: a small fake of the torch CUDA stream API records every enqueued GPU operation with the
operations it must wait for (program order on its stream, ``wait_stream``, ``wait_event``). The copied
``batched_to_gpu`` is then driven exactly as lmcache 0.5.3 drives it (``LMCacheEngine.retrieve_layer``
sends each layer's memory objects, ``LMCBlender.blend_layer`` computes that layer right after), and the
dependency graph is checked: correct (no buffer read before its load, no buffer overwritten while read)
and overlapped (the load of layer i does not wait for the compute of layer i-1).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from kvdemo.lmcache_patches import layerwise_sync

NUM_LAYERS = 6
SEGMENTS = [(0, 4), (5, 9), (10, 14)]  # (start, end) of three retrieved segments; gaps = separators


class GpuOp:
    def __init__(self, label: tuple, stream: FakeStream, deps: set[GpuOp]) -> None:
        self.label, self.stream, self.deps = label, stream, deps

    def __repr__(self) -> str:
        return f"GpuOp{self.label}@{self.stream.name}"


class FakeStream:
    def __init__(self, gpu: FakeCuda, name: str) -> None:
        self.gpu, self.name = gpu, name
        self.ops: list[GpuOp] = []
        self.pending: set[GpuOp] = set()

    def enqueue(self, label: tuple) -> GpuOp:
        deps = set(self.pending) | ({self.ops[-1]} if self.ops else set())
        self.pending.clear()
        op = GpuOp(label, self, deps)
        self.ops.append(op)
        self.gpu.ops.append(op)
        return op

    def wait_stream(self, other: FakeStream) -> None:
        if other.ops:
            self.pending.add(other.ops[-1])

    def wait_event(self, event: FakeEvent) -> None:
        if event.op is not None:
            self.pending.add(event.op)

    def synchronize(self) -> None:
        self.gpu.host_syncs.append(self.name)


class FakeEvent:
    def __init__(self, gpu: FakeCuda) -> None:
        self.gpu, self.op = gpu, None

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream or self.gpu.current
        self.op = stream.ops[-1] if stream.ops else None


class FakeCuda:
    """torch.cuda as used by the copied batched_to_gpu."""

    def __init__(self) -> None:
        self.ops: list[GpuOp] = []
        self.host_syncs: list[str] = []
        self.compute = FakeStream(self, "compute")
        self.current = self.compute

    def current_stream(self) -> FakeStream:
        return self.current

    @contextmanager
    def stream(self, s: FakeStream) -> Iterator[None]:
        before, self.current = self.current, s
        try:
            yield
        finally:
            self.current = before

    def Event(self) -> FakeEvent:
        return FakeEvent(self)

    def Stream(self) -> FakeStream:
        return FakeStream(self, f"side{len(self.ops)}")

    def synchronize(self) -> None:
        self.host_syncs.append("device")


class FakeGpuTensor:
    """A GPU tensor (or view) named by the buffer it lives in; writes are enqueued on the current stream."""

    def __init__(self, gpu: FakeCuda, name: str) -> None:
        self.gpu, self.name, self.device = gpu, name, "cuda:0"

    def __getitem__(self, index: Any) -> FakeGpuTensor:
        return self

    def __setitem__(self, index: Any, value: Any) -> None:
        # torch turns a Python scalar into a CPU tensor and copies it with a host sync (trace on the H100)
        if isinstance(value, float):
            self.gpu.host_syncs.append(f"scalar-to-{self.name}")
        self.gpu.current.enqueue(("write", self.name))

    def index_fill_(self, dim: int, index: Any, value: float) -> FakeGpuTensor:
        assert isinstance(value, float)  # a Python scalar: no host-to-device copy, no host sync
        self.gpu.current.enqueue(("write", self.name))
        return self

    def copy_(self, src: Any, non_blocking: bool = False) -> FakeGpuTensor:
        assert non_blocking
        self.gpu.current.enqueue(("load", src.layer, self.name))
        return self

    def numel(self) -> int:
        return 2  # two separator gaps: the zeroing path runs


def fake_torch(gpu: FakeCuda) -> types.SimpleNamespace:
    def make(name: str) -> Any:
        return lambda *a, **k: FakeGpuTensor(gpu, name)

    return types.SimpleNamespace(
        cuda=gpu, bool="bool", int64="int64", ones=make("gap_mask"), arange=make("new_positions"),
        zeros=make("old_positions"), where=lambda t: (FakeGpuTensor(gpu, "gap_positions"),))


class HostTensor:
    def __init__(self, layer: int) -> None:
        self.layer = layer


class MemoryObj:
    """A retrieved CPU memory object of one segment and layer (format KV_2TD: [K, V])."""

    def __init__(self, layer: int) -> None:
        self.tensor = [HostTensor(layer), HostTensor(layer)]
        self.metadata = types.SimpleNamespace(fmt="KV_2TD", cached_positions=object())


class Connector:
    """The attributes of lmcache 0.5.3's VLLMBufferLayerwiseGPUConnector that batched_to_gpu touches."""

    def __init__(self, gpu: FakeCuda) -> None:
        self.gpu = gpu
        self.num_layers = NUM_LAYERS
        self.kvcaches = [FakeGpuTensor(gpu, f"paged{i}") for i in range(NUM_LAYERS)]
        self.cache_positions = True
        self.fused_rotary_emb = self._rope
        self.load_stream = FakeStream(gpu, "load")
        self.buffer_mapping: dict[int, Any] = {}
        self.current_gap_positions = None
        self.dtype = "bfloat16"
        self.engine_kv_format = "flash_attn"
        self.allocated = 0
        self.gpu_buffer_allocator = types.SimpleNamespace(allocate=self._allocate)

    def _allocate(self, shape: Any, dtype: Any, fmt: Any) -> Any:
        self.allocated += 1
        return types.SimpleNamespace(tensor=FakeGpuTensor(self.gpu, f"buf{self.allocated}"),
                                     ref_count_down=lambda: None)

    def _rope(self, old: Any, new: Any, k: FakeGpuTensor) -> FakeGpuTensor:
        self.gpu.current.enqueue(("rope", k.name))
        return k

    def initialize_kvcaches_ptr(self, **kwargs: Any) -> None:
        pass

    def _lazy_initialize_buffer(self, kv_caches: Any) -> None:
        pass

    def get_shape(self, num_tokens: int) -> tuple:
        return (2, num_tokens, 8)


def after(op: GpuOp, earlier: GpuOp) -> bool:
    """True when the GPU cannot start ``op`` before ``earlier`` has finished."""
    seen, todo = set(), list(op.deps)
    while todo:
        dep = todo.pop()
        if dep is earlier:
            return True
        if dep not in seen:
            seen.add(dep)
            todo.extend(dep.deps)
    return False


def drive_blend(gpu: FakeCuda) -> dict[str, dict[int, list[GpuOp]]]:
    """Run the copied batched_to_gpu the way retrieve_layer + blend_layer do; return the ops by kind/layer."""
    lmc_ops = types.SimpleNamespace(
        TransferDirection=types.SimpleNamespace(H2D="H2D"),
        single_layer_kv_transfer=lambda buf, paged, *a, **k: gpu.current.enqueue(("transfer", buf.name, paged.name)))
    module = types.SimpleNamespace(torch=fake_torch(gpu), lmc_ops=lmc_ops,
                                   MemoryFormat=types.SimpleNamespace(KV_2TD="KV_2TD"), LMCBlenderBuilder=None,
                                   logger=logging.getLogger("fake-lmcache"))
    connector = Connector(gpu)
    batched_to_gpu = layerwise_sync.make_batched_to_gpu(module)
    starts, ends = [s for s, _ in SEGMENTS], [e for _, e in SEGMENTS]
    consumer = batched_to_gpu(connector, starts, ends, slot_mapping=FakeGpuTensor(gpu, "slots"))
    next(consumer)
    for layer in range(NUM_LAYERS):
        consumer.send([MemoryObj(layer) for _ in SEGMENTS])  # retrieve_layer: this layer's objects
        buffer = connector.buffer_mapping[layer].tensor  # blender.process_qkv: gpu_connector.get_kv(layer)
        gpu.compute.enqueue(("compute", layer, buffer.name))  # compute_layer, on vLLM's stream
    with pytest.raises(StopIteration):
        next(consumer)  # retrieve_layer: "synchronize the last layer"; then the generator ends
        next(consumer)
    assert connector.buffer_mapping == {}

    by_kind: dict[str, dict[int, list[GpuOp]]] = {"load": {}, "compute": {}, "transfer": {}, "rope": {}}
    for op in gpu.ops:
        kind = op.label[0]
        if kind in ("load", "compute"):
            by_kind[kind].setdefault(op.label[1], []).append(op)
    # transfers and ropes are enqueued in layer order (one per layer)
    by_kind["transfer"] = {i: [op] for i, op in enumerate(o for o in gpu.ops if o.label[0] == "transfer")}
    by_kind["rope"] = {i: [op] for i, op in enumerate(o for o in gpu.ops if o.label[0] == "rope")}
    return by_kind


def test_layerwise_loads_overlap_compute_and_stay_correct() -> None:
    gpu = FakeCuda()
    ops = drive_blend(gpu)
    L = NUM_LAYERS
    assert all(len(ops["load"][i]) == 2 * len(SEGMENTS) for i in range(L))  # K and V of every segment
    assert sorted(ops["transfer"]) == sorted(ops["rope"]) == list(range(L))
    for i in range(L):
        (compute,) = ops["compute"][i]
        loads = ops["load"][i]
        buffer = compute.label[2]
        assert {op.label[2] for op in loads} == {buffer}, "layer i is computed from the buffer it was loaded into"
        assert all(after(compute, load) for load in loads), f"compute {i} may start before its load"
        assert after(compute, ops["rope"][i][0]), f"compute {i} may read K before RoPE is re-applied"
        assert after(ops["transfer"][i][0], compute), f"paged transfer {i} may run before the blend wrote it"
        if i >= 1:
            # the overlap: loading layer i must not wait for the compute of layer i-1
            (previous_compute,) = ops["compute"][i - 1]
            assert not any(after(load, previous_compute) for load in loads), f"load {i} waits for compute {i - 1}"
            assert ops["compute"][i - 1][0].label[2] != buffer, "ping-pong: consecutive layers use two buffers"
        if i >= 2:
            # ... but it overwrites the buffer of layer i-2: wait until everything reading that is done
            (reader,) = ops["compute"][i - 2]
            assert all(after(load, reader) for load in loads), f"load {i} may overwrite layer {i - 2} in use"
            assert all(after(load, ops["transfer"][i - 2][0]) for load in loads)
    # one host wait, at the end (retrieve_layer then releases the CPU memory objects), no device-wide sync
    assert gpu.host_syncs == ["load"]


def test_the_first_fix_serialized_every_load_behind_the_previous_compute() -> None:
    """The checker above is not vacuous: waiting for the whole compute stream (this fix's first version)
    makes every load wait for the previous layer's compute."""
    gpu = FakeCuda()
    original_wait_event = FakeStream.wait_event

    def wait_whole_stream(self: FakeStream, event: FakeEvent) -> None:
        self.wait_stream(gpu.compute)

    FakeStream.wait_event = wait_whole_stream  # type: ignore[method-assign]
    try:
        ops = drive_blend(gpu)
    finally:
        FakeStream.wait_event = original_wait_event  # type: ignore[method-assign]
    assert all(after(ops["load"][i][0], ops["compute"][i - 1][0]) for i in range(1, NUM_LAYERS))
