"""Fix 'async_save' on CPU: copies enqueued before the step returns and behind its compute, puts after their
event, the fence before freed blocks are reused, nothing lost at shutdown, and (with torch) the same bytes
as LMCache's synchronous store.

No vLLM or LMCache: fake modules at the exact paths the fix patches, and a fake GPU whose streams run their
work only when an event is waited for (so "enqueued" and "done" are different moments, as on a GPU).
"""

from __future__ import annotations

import threading
import time
import types
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
from helpers import fake_module

from kvdemo import vllm_plugin as vp
from kvdemo.lmcache_patches import async_save, hooks, targets
from kvdemo.lmcache_patches.save_queue import SaveJob, SaveQueue

CHUNK = 4  # tokens per LMCache chunk in these fakes
LAYERS, HIDDEN, BLOCK = 2, 3, 2

# --------------------------------------------------------------------------------------------------
# A fake GPU: streams are queues of work that runs when someone waits for an event
# --------------------------------------------------------------------------------------------------


class FakeEvent:
    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu, self.done = gpu, False

    def record(self, stream: FakeStream) -> None:
        stream.ops.append(("record", self))

    def synchronize(self) -> None:
        self.gpu.run_until(self)


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ops: deque[tuple[str, Any]] = deque()

    def wait_event(self, event: FakeEvent) -> None:
        self.ops.append(("wait", event))


class FakeGpu:
    """Runs nothing until ``go`` is set; then, to reach an event, runs the streams in ``prefer`` order, each
    as far as its waits allow (``side`` first: a copy not ordered behind the compute would run too early;
    ``compute`` first: a later step's write would land before a copy that nothing fenced)."""

    def __init__(self, log: list[str], prefer: str = "side") -> None:
        self.log, self.prefer = log, prefer
        self.compute, self.current = FakeStream("compute"), None
        self.current = self.compute
        self.streams = [self.compute]
        self.go = threading.Event()
        self.lock = threading.RLock()
        self.kernel: Callable[..., None] = self.record_kernel

    # the CudaOps interface -------------------------------------------------------------------------
    def current_stream(self) -> FakeStream:
        return self.current

    def event(self, timing: bool = False) -> FakeEvent:
        return FakeEvent(self)

    @contextmanager
    def use_stream(self, stream: FakeStream) -> Iterator[None]:
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def transfer(self, *args: Any, **kwargs: Any) -> None:
        self.current.ops.append(("run", lambda: self.kernel(*args, **kwargs)))

    def d2h(self) -> str:
        return "D2H"

    def copy(self, dst: Any, src: Any) -> None:
        self.current.ops.append(("run", lambda: dst.copy_(src)))

    def elapsed_s(self, start: FakeEvent, end: FakeEvent) -> float:
        return 0.002

    def thread_initializer(self) -> None:
        return None

    def inference_mode(self) -> Any:
        return nullcontext()

    # the test's side -------------------------------------------------------------------------------
    def stream(self, name: str) -> FakeStream:
        stream = FakeStream(name)
        self.streams.append(stream)
        return stream

    def launch(self, what: str, fn: Callable[[], None] = lambda: None) -> None:
        """Enqueue work on the compute stream (a forward pass)."""
        self.compute.ops.append(("run", lambda: (self.log.append(what), fn())))

    def record_kernel(self, dst: Any, pointers: Any, slots: Any, *args: Any, **kwargs: Any) -> None:
        self.log.append(f"copy {list(slots)}")
        dst.data = list(slots)

    def run_until(self, event: FakeEvent | None) -> None:
        if not self.go.wait(timeout=10):
            raise TimeoutError("the fake GPU was never started")
        with self.lock:
            order = sorted(self.streams, key=lambda s: (s is self.compute) == (self.prefer == "side"))
            while event is None or not event.done:
                if not any(self._step(stream) for stream in order):
                    if event is None:
                        return
                    raise RuntimeError("fake GPU: the event is never reached")

    def _step(self, stream: FakeStream) -> bool:
        ran = False
        while stream.ops:
            kind, what = stream.ops[0]
            if kind == "wait" and not what.done:
                break
            stream.ops.popleft()
            if kind == "record":
                what.done = True
            elif kind == "run":
                what()
            ran = True
        return ran


# --------------------------------------------------------------------------------------------------
# Fake LMCache (0.5.3 shapes) and vLLM connector
# --------------------------------------------------------------------------------------------------


class Buf:
    """A memory object's CPU buffer when torch is not used."""

    def __init__(self) -> None:
        self.data: Any = None

    def copy_(self, src: Any) -> None:
        self.data = src.data


class MemObj:
    def __init__(self, tensor: Any) -> None:
        self.tensor, self.refs = tensor, 1

    def get_size(self) -> int:
        return 1_000_000

    def ref_count_down(self) -> None:
        self.refs -= 1


class Storage:
    def __init__(self, log: list[str], make: Callable[[tuple], Any]) -> None:
        self.log, self.make = log, make
        self.objs: list[MemObj] = []
        self.puts: dict[str, Any] = {}

    def allocate(self, shapes: list[tuple], dtypes: list[Any], busy_loop: bool = True,
                 fmt: Any = None) -> MemObj:
        obj = MemObj(self.make(shapes[0]))
        self.objs.append(obj)
        return obj

    def batched_put(self, keys: list[str], objs: list[MemObj], transfer_spec: Any = None,
                    location: Any = None) -> None:
        self.log.append(f"put {','.join(keys)}")
        for key, obj in zip(keys, objs):
            self.puts[key] = obj.tensor.clone() if hasattr(obj.tensor, "clone") else obj.tensor.data
            obj.ref_count_down()


class KeyDb:
    def process_tokens(self, tokens: Any = None, hashes: Any = None, offsets: Any = None, mask: Any = None,
                       make_key: bool = True, request_configs: Any = None) -> Iterator[tuple[int, int, str]]:
        first = 0 if mask is None else len(tokens) - int(mask.sum())
        for start in range(first, len(tokens), CHUNK):
            yield start, min(start + CHUNK, len(tokens)), f"{tokens[start]}:{start}"


class StoreStats:
    @contextmanager
    def profile_process_tokens(self) -> Iterator[None]:
        yield

    profile_from_gpu = profile_put = profile_process_tokens


class StatsMonitor:
    def __init__(self) -> None:
        self.finished: list[int] = []

    def on_store_request(self, n: int) -> StoreStats:
        return StoreStats()

    def on_store_finished(self, stats: StoreStats, n: int) -> None:
        self.finished.append(n)


class Meta:
    def get_shapes(self, n: int) -> list[tuple]:
        return [(2, LAYERS, n, HIDDEN)]

    def get_dtypes(self) -> list[Any]:
        return ["bf16"]


class Mask:
    """torch.ones(n, dtype=bool) with its first ``skip`` entries False, as wait_for_save builds it."""

    def __init__(self, n: int, skip: int) -> None:
        self.n, self.skip = n, skip

    def __len__(self) -> int:
        return self.n

    def sum(self) -> int:
        return self.n - self.skip


def _engine_cls() -> type:
    class LMCacheEngine:
        """lmcache 0.5.3 cache_engine.py: the attributes store uses, and store itself abridged (no stats)."""

        def __init__(self, connector: Any, storage: Storage) -> None:
            self.gpu_connector, self.storage_manager = connector, storage
            self.token_database, self.stats_monitor, self.metadata = KeyDb(), StatsMonitor(), Meta()
            self.config = types.SimpleNamespace(get_extra_config_value=lambda name, default=None: default)
            self.fmt = self.store_location = None
            self.kv_events_enabled = False
            self.sync_stores = 0

        def is_healthy(self) -> bool:
            return True

        def _is_passive(self) -> bool:
            return False

        def is_frozen(self) -> bool:
            return False

        def _get_req_id(self, kwargs: dict) -> str:
            return kwargs.get("req_id", "unspecified")

        def _log_kvcache_for_check(self, **kwargs: Any) -> None:
            pass

        def store(self, tokens: Any = None, hashes: Any = None, offsets: Any = None, mask: Any = None,
                  **kwargs: Any) -> None:
            self.sync_stores += 1
            keys, objs, starts, ends = [], [], [], []
            chunks = self.token_database.process_tokens(tokens, hashes, offsets, mask,
                                                        request_configs=kwargs.get("request_configs"))
            for start, end, key in chunks:
                objs.append(self.storage_manager.allocate(self.metadata.get_shapes(end - start),
                                                          self.metadata.get_dtypes(), busy_loop=False,
                                                          fmt=self.fmt))
                keys.append(key)
                starts.append(start)
                ends.append(end)
            if not objs:
                return
            self.gpu_connector.batched_from_gpu(objs, starts, ends, **kwargs)
            self.storage_manager.batched_put(keys, objs, transfer_spec=kwargs.get("transfer_spec"),
                                             location=self.store_location)

    return LMCacheEngine


class VLLMPagedMemGPUConnectorV2:
    """lmcache 0.5.3 gpu_connectors.py:146: the attributes the copy uses; from_gpu runs its kernel at once."""

    def __init__(self, gpu: FakeGpu, buffer: Any = None) -> None:
        self.gpu, self.gpu_buffer = gpu, buffer
        self.store_stream = gpu.stream("store")
        self.kvcaches: Any = None
        self.page_buffer_size, self.engine_kv_format = 64, "NHD"
        self.block_size, self.head_size = BLOCK, HIDDEN
        self.use_mla = False

    def initialize_kvcaches_ptr(self, **kwargs: Any) -> None:
        if "kvcaches" in kwargs:
            self.kvcaches = kwargs["kvcaches"]

    def _initialize_pointers(self, kvcaches: Any) -> Any:
        return kvcaches  # the fake kernel reads the layers themselves

    def from_gpu(self, obj: MemObj, start: int, end: int, **kwargs: Any) -> None:
        self.initialize_kvcaches_ptr(**kwargs)
        slots, pointers = kwargs["slot_mapping"][start:end], self._initialize_pointers(self.kvcaches)
        args = (pointers, slots, None, self.page_buffer_size, "D2H", self.engine_kv_format)
        if self.gpu_buffer is None or end - start != self.gpu_buffer.shape[2]:
            self.gpu.kernel(obj.tensor, *args, block_size=self.block_size, head_size=self.head_size)
        else:
            tmp = self.gpu_buffer[:, :, : end - start, :]
            self.gpu.kernel(tmp, *args, block_size=self.block_size, head_size=self.head_size)
            obj.tensor.copy_(tmp)

    def batched_from_gpu(self, objs: list[MemObj], starts: list[int], ends: list[int], **kwargs: Any) -> None:
        for obj, start, end in zip(objs, starts, ends):
            self.from_gpu(obj, start, end, **kwargs)


class Request:
    def __init__(self, req_id: str, tokens: list[int], slots: Any, skip: int = 0, mask: Any = None,
                 transfer_spec: Any = None) -> None:
        self.req_id, self.token_ids, self.slot_mapping, self.skip = req_id, tokens, slots, skip
        self.mask = mask if mask is not None else Mask(len(tokens), skip)
        self.transfer_spec = transfer_spec


def _adapter_cls() -> type:
    class LMCacheConnectorV1Impl:
        """lmcache 0.5.3 vllm_v1_adapter.py:1103-1257, abridged: store each request of the step."""

        def __init__(self, engine: Any, kvcaches: list[Any]) -> None:
            self.lmcache_engine, self.kvcaches = engine, kvcaches
            self.requests: list[Request] = []

        def build_connector_meta(self, scheduler_output: Any) -> Any:
            return types.SimpleNamespace(requests=list(scheduler_output.requests))

        def wait_for_save(self) -> None:
            for r in self.requests:
                self.lmcache_engine.store(r.token_ids, mask=r.mask, kvcaches=self.kvcaches,
                                          slot_mapping=r.slot_mapping, offset=r.skip,
                                          transfer_spec=r.transfer_spec, request_configs=None,
                                          req_id=r.req_id)

    return LMCacheConnectorV1Impl


def _vllm_connector_cls() -> type:
    class KVConnectorBase_V1:
        def handle_preemptions(self, kv_connector_metadata: Any) -> None:
            return None

        def shutdown(self) -> None:
            return None

    class LMCacheConnectorV1(KVConnectorBase_V1):
        def __init__(self, impl: Any) -> None:
            self._lmcache_engine = impl

        def wait_for_save(self) -> None:
            self._lmcache_engine.wait_for_save()

    return LMCacheConnectorV1


@pytest.fixture(autouse=True)
def clean_plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in (vp.ENV_ENABLE, vp.ENV_FIXES, vp.ENV_PROFILE):
        monkeypatch.delenv(var, raising=False)
    vp._reset_for_tests()
    yield
    vp._reset_for_tests()


class World(types.SimpleNamespace):
    """One engine's fakes: the GPU, the event log, the LMCache engine, vLLM's connector."""

    def save(self, *requests: Request) -> None:
        """One engine step: the forward pass is enqueued, then vLLM calls wait_for_save."""
        self.gpu.launch("forward", self.forward)
        self.impl.requests = list(requests)
        self.connector.wait_for_save()
        self.log.append("returned")

    def metadata(self, finished: set[str] = frozenset(), preempted: set[str] | None = None) -> Any:
        out = types.SimpleNamespace(requests=[], finished_req_ids=set(finished), preempted_req_ids=preempted)
        return self.impl.build_connector_meta(out)

    def drained(self) -> None:
        assert self.engine._kvdemo_save_queue.drain(timeout=10)


def make_world(monkeypatch: pytest.MonkeyPatch, prefer: str = "side", fixes: str = "async_save",
               make: Callable[[tuple], Any] = lambda shape: Buf(), buffer: Any = None,
               kvcaches: Any = None, vllm_has_fence: bool = True, version: str = "0.5.3") -> World:
    log: list[str] = []
    gpu = FakeGpu(log, prefer)
    monkeypatch.setattr(async_save, "GPU", gpu)
    monkeypatch.setattr(hooks, "lmcache_version", lambda: version)
    for pkg in ("lmcache", "lmcache.v1", "lmcache.integration", "lmcache.integration.vllm", "vllm",
                "vllm.distributed", "vllm.distributed.kv_transfer",
                "vllm.distributed.kv_transfer.kv_connector", "vllm.distributed.kv_transfer.kv_connector.v1"):
        fake_module(monkeypatch, pkg)
    engine_cls, impl_cls, vllm_cls = _engine_cls(), _adapter_cls(), _vllm_connector_cls()
    if not vllm_has_fence:
        vllm_cls = type("LMCacheConnectorV1", (), {"__init__": vllm_cls.__init__,
                                                  "wait_for_save": vllm_cls.wait_for_save})
    fake_module(monkeypatch, targets.MOD_CACHE_ENGINE, LMCacheEngine=engine_cls)
    fake_module(monkeypatch, targets.MOD_ADAPTER, LMCacheConnectorV1Impl=impl_cls)
    fake_module(monkeypatch, targets.MOD_VLLM_LMCACHE_CONNECTOR, LMCacheConnectorV1=vllm_cls)
    monkeypatch.setenv(vp.ENV_ENABLE, "1")
    monkeypatch.setenv(vp.ENV_FIXES, fixes)
    vp.register()
    kvcaches = kvcaches if kvcaches is not None else [types.SimpleNamespace(device="cuda:0")] * LAYERS
    engine = engine_cls(VLLMPagedMemGPUConnectorV2(gpu, buffer), Storage(log, make))
    impl = impl_cls(engine, kvcaches)
    return World(log=log, gpu=gpu, engine=engine, impl=impl, connector=vllm_cls(impl), forward=lambda: None,
                 classes=types.SimpleNamespace(engine=engine_cls, impl=impl_cls, vllm=vllm_cls))


def tokens(n: int, base: int = 100) -> list[int]:
    return list(range(base, base + n))


# --------------------------------------------------------------------------------------------------
# The save queue alone
# --------------------------------------------------------------------------------------------------


class GateEvent:
    """A done-event the test completes by hand (or makes fail)."""

    def __init__(self, log: list[str], name: str, fail: bool = False) -> None:
        self.log, self.name, self.fail = log, name, fail
        self.gate = threading.Event()

    def synchronize(self) -> None:
        if not self.gate.wait(timeout=10):
            raise TimeoutError(self.name)
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.log.append(f"done {self.name}")


def _job(log: list[str], req_id: str, event: GateEvent) -> SaveJob:
    return SaveJob(req_id, event, put=lambda: log.append(f"put {event.name}"),
                   release=lambda: log.append(f"release {event.name}"), keep=("slot mapping",))


def test_queue_puts_each_job_after_its_copy_in_submission_order() -> None:
    log: list[str] = []
    queue = SaveQueue()
    events = [GateEvent(log, f"j{i}") for i in range(3)]
    jobs = [_job(log, f"r{i % 2}", e) for i, e in enumerate(events)]
    for job in jobs:
        queue.submit(job)
    time.sleep(0.05)
    assert log == [] and queue.pending_requests() == {"r0", "r1"}
    for event in reversed(events):
        event.gate.set()
    assert queue.close(timeout=10)
    assert log == ["done j0", "put j0", "done j1", "put j1", "done j2", "put j2"]
    assert queue.pending_requests() == set() and all(job.keep == () for job in jobs)
    with pytest.raises(RuntimeError):
        queue.submit(_job(log, "r9", GateEvent(log, "late")))


def test_fence_waits_for_the_named_requests_only() -> None:
    log: list[str] = []
    queue = SaveQueue()
    first, second = GateEvent(log, "a"), GateEvent(log, "b")
    queue.submit(_job(log, "req-a", first))
    queue.submit(_job(log, "req-b", second))
    assert queue.fence(["req-b-unrelated", "other"]) == 0
    fenced = threading.Thread(target=queue.fence, args=(["req-a"],))
    fenced.start()
    fenced.join(0.1)
    assert fenced.is_alive()  # the copy of req-a is not complete
    first.gate.set()
    fenced.join(5)
    assert not fenced.is_alive()
    everything = threading.Thread(target=queue.fence, args=(None,))
    everything.start()
    everything.join(0.1)
    assert everything.is_alive()  # None: every pending copy, req-b's too
    second.gate.set()
    everything.join(5)
    assert queue.close(timeout=10)


def test_a_failed_copy_releases_its_chunks_and_puts_nothing(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    queue = SaveQueue()
    bad, good = GateEvent(log, "bad", fail=True), GateEvent(log, "good")
    queue.submit(_job(log, "r", bad))
    queue.submit(_job(log, "r", good))
    bad.gate.set()
    good.gate.set()
    assert queue.close(timeout=10)
    assert log == ["release bad", "done good", "put good"]
    assert "the copy off the GPU failed" in caplog.text


# --------------------------------------------------------------------------------------------------
# The fix in the plugin
# --------------------------------------------------------------------------------------------------


def test_async_save_is_opt_in() -> None:
    assert "async_save" not in vp.parse_fixes(None) and "async_save" not in vp.parse_fixes("all")
    assert vp.parse_fixes("all,async_save") == set(vp.ALL_FIXES) | {"async_save"}
    assert vp.parse_fixes("async_save") == {"async_save"}


def test_copies_are_enqueued_before_the_step_returns_and_put_after_their_event(
        monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch)
    assert hooks.already(w.classes.engine.store, "async_save")
    w.save(Request("r1", tokens(10), list(range(20, 30)), skip=4))
    store_ops = [kind for kind, _ in w.engine.gpu_connector.store_stream.ops]
    assert store_ops == ["wait", "record", "run", "run", "record"]  # 2 chunks: tokens 4-7, 8-9
    compute_ops = [kind for kind, _ in w.gpu.compute.ops]
    assert compute_ops == ["run", "record"]  # the forward, then the event the copies wait on
    assert w.engine.gpu_connector.store_stream.ops[0][1] is w.gpu.compute.ops[1][1]
    assert w.log == ["returned"] and w.engine.sync_stores == 0 and w.engine.storage_manager.puts == {}
    w.gpu.go.set()
    w.drained()
    assert w.log == ["returned", "forward", "copy [24, 25, 26, 27]", "copy [28, 29]", "put 104:4,108:8"]
    assert w.engine.storage_manager.puts == {"104:4": [24, 25, 26, 27], "108:8": [28, 29]}
    assert all(obj.refs == 0 for obj in w.engine.storage_manager.objs)
    assert w.engine.stats_monitor.finished == [6]


def test_the_put_logs_what_the_step_paid_and_the_copy_rate(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    w = make_world(monkeypatch)
    w.gpu.go.set()
    with caplog.at_level("INFO", logger=vp.logger.name):
        w.save(Request("cmpl-x-0", tokens(8), list(range(8))))
        w.drained()
    line = next(m for m in caplog.messages if "kvdemo async_save: [req_id=cmpl-x-0]" in m)
    assert "stored 8 of 8 tokens (0.002 GB): the step paid" in line and "2.0 ms (1.0 GB/s)" in line
    from kvdemo.bench.share_cases import store_figures  # the share bench reads this line from A's log

    figures = store_figures([line], "x")
    assert figures is not None and figures["mode"] == "async" and figures["copy_ms"] == 2.0


def test_handle_preemptions_waits_for_the_copies_of_freed_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch)
    w.save(Request("r1", tokens(4), [1, 2, 3, 4]), Request("r2", tokens(4, 200), [5, 6, 7, 8]))
    meta = w.metadata(finished={"r1"}, preempted={"r9"})
    assert getattr(meta, async_save.FREED_ATTR) == {"r1", "r9"}
    w.connector.handle_preemptions(w.metadata(finished={"r7"}))  # nothing of ours freed: no wait
    fenced = threading.Thread(target=w.connector.handle_preemptions, args=(meta,))
    fenced.start()
    fenced.join(0.1)
    assert fenced.is_alive() and w.log == ["returned"]  # r1's copy has not run: its blocks stay untouched
    w.gpu.go.set()
    fenced.join(5)
    assert not fenced.is_alive() and "copy [1, 2, 3, 4]" in w.log
    w.drained()


def test_metadata_without_freed_ids_waits_for_every_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch)
    w.save(Request("r1", tokens(4), [1, 2, 3, 4]))
    w.gpu.go.set()
    assert async_save.fence(w.engine, types.SimpleNamespace(requests=[])) == 1
    assert "copy [1, 2, 3, 4]" in w.log
    w.drained()


def test_shutdown_flushes_pending_saves(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch)
    for i in range(3):
        w.save(Request(f"r{i}", tokens(8, 100 * i), list(range(8 * i, 8 * i + 8))))
    threading.Timer(0.2, w.gpu.go.set).start()
    w.connector.shutdown()
    assert len(w.engine.storage_manager.puts) == 6 and all(o.refs == 0 for o in w.engine.storage_manager.objs)
    assert w.engine._kvdemo_save_queue.closed
    w.save(Request("late", tokens(4, 900), [60, 61, 62, 63]))  # after shutdown: LMCache's own store
    assert w.engine.sync_stores == 1


def test_other_stores_stay_lmcaches_own(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch)
    w.gpu.go.set()
    w.engine.store(tokens(4), mask=Mask(4, 0), kvcaches=w.impl.kvcaches, slot_mapping=[1, 2, 3, 4],
                   req_id="direct")
    assert w.engine.sync_stores == 1  # not from wait_for_save
    w.save(Request("pd", tokens(4), [1, 2, 3, 4], transfer_spec="disagg"))
    assert w.engine.sync_stores == 2  # a disaggregation spec
    w.engine.gpu_connector.use_mla = True
    w.save(Request("mla", tokens(4), [1, 2, 3, 4]))
    assert w.engine.sync_stores == 3 and getattr(w.engine, "_kvdemo_save_queue", None) is None


def test_without_vllms_fence_every_store_stays_synchronous(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger=vp.logger.name):
        w = make_world(monkeypatch, vllm_has_fence=False)
        w.gpu.go.set()
        w.save(Request("r1", tokens(4), [1, 2, 3, 4]))
    assert w.engine.sync_stores == 1
    assert "handle_preemptions could not be wrapped" in caplog.text


def test_needs_the_copied_lmcache_version(monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    w = make_world(monkeypatch, version="0.6.0")
    assert not hooks.already(w.classes.engine.store, "async_save")
    assert "fix 'async_save' is a copy of lmcache 0.5.3's" in caplog.text


def test_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch, fixes="all")
    assert not hooks.already(w.classes.engine.store, "async_save")
    assert not async_save.STATE.fence_ready


# --------------------------------------------------------------------------------------------------
# With torch on CPU: the bytes
# --------------------------------------------------------------------------------------------------


def _torch_world(monkeypatch: pytest.MonkeyPatch, prefer: str) -> tuple[Any, World, list[Any]]:
    torch = pytest.importorskip("torch")
    num_blocks = 16
    layers = [torch.zeros(2, num_blocks, BLOCK, 1, HIDDEN, dtype=torch.bfloat16) for _ in range(LAYERS)]

    def gather(dst: Any, pointers: Any, slots: Any, *args: Any, **kwargs: Any) -> None:
        for layer, kv in enumerate(pointers):
            dst[:, layer] = kv.reshape(2, -1, HIDDEN)[:, slots.long()]

    w = make_world(monkeypatch, prefer=prefer, kvcaches=layers,
                   make=lambda shape: torch.empty(shape, dtype=torch.bfloat16),
                   buffer=torch.empty(2, LAYERS, CHUNK, HIDDEN, dtype=torch.bfloat16))
    w.gpu.kernel = gather
    return torch, w, layers


def _fill(torch: Any, layers: list[Any], seed: int) -> Callable[[], None]:
    """A forward pass: writes the KV of every slot."""
    def forward() -> None:
        gen = torch.Generator().manual_seed(seed)
        for kv in layers:
            kv.copy_(torch.randn(kv.shape, generator=gen).to(torch.bfloat16))
    return forward


def _as_bytes(torch: Any, t: Any) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_async_bytes_are_the_synchronous_stores(monkeypatch: pytest.MonkeyPatch) -> None:
    torch, w, layers = _torch_world(monkeypatch, prefer="side")
    slots = torch.randperm(32)[:11]  # 11 tokens: two full chunks through the buffer, one partial chunk direct
    mask = torch.ones(11, dtype=torch.bool)
    w.forward = _fill(torch, layers, seed=1)
    w.save(Request("r1", tokens(11), slots, mask=mask))
    w.gpu.go.set()
    w.drained()
    async_puts = dict(w.engine.storage_manager.puts)

    for kv in layers:  # the same step again, through LMCache's own store
        kv.zero_()
    w.engine.storage_manager.puts.clear()
    async_save.STATE.fence_ready = False
    w.gpu.launch("forward", w.forward)
    w.gpu.run_until(None)  # LMCache's wait_for_save blocks in slot_mapping.to(device) until the forward ran
    w.impl.requests = [Request("r1", tokens(11), slots, mask=mask)]
    w.connector.wait_for_save()
    sync_puts = w.engine.storage_manager.puts
    assert w.engine.sync_stores == 1 and list(async_puts) == list(sync_puts) == ["100:0", "104:4", "108:8"]
    for key, (start, end) in zip(sync_puts, [(0, 4), (4, 8), (8, 11)]):
        assert _as_bytes(torch, async_puts[key]) == _as_bytes(torch, sync_puts[key])
        expected = torch.stack([kv.reshape(2, -1, HIDDEN)[:, slots[start:end]] for kv in layers], dim=1)
        assert torch.equal(async_puts[key], expected)
        assert async_puts[key].abs().sum() > 0  # the copy ran after the forward wrote the KV


def test_a_freed_requests_blocks_are_overwritten_only_after_its_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    torch, w, layers = _torch_world(monkeypatch, prefer="compute")
    slots = torch.arange(8, 16)
    w.forward = _fill(torch, layers, seed=2)

    def next_step_reuses_the_blocks(freed: set[str]) -> dict:
        w.engine.storage_manager.puts.clear()
        w.save(Request("r1", tokens(8), slots))
        expected = None

        def snapshot() -> None:
            nonlocal expected
            expected = torch.stack([kv.reshape(2, -1, HIDDEN)[:, slots] for kv in layers], dim=1)

        w.gpu.launch("snapshot", snapshot)
        # The next step: vLLM calls handle_preemptions, then enqueues kernels overwriting r1's freed blocks.
        # The GPU makes progress only when made to: by the fence, else after the overwrite is enqueued.
        fence = threading.Thread(target=w.connector.handle_preemptions, args=(w.metadata(finished=freed),))
        fence.start()
        fence.join(0.2)
        if fence.is_alive():
            w.gpu.go.set()
            fence.join(5)
        w.gpu.launch("next forward", lambda: [kv.zero_() for kv in layers])
        w.gpu.go.set()
        w.drained()
        w.gpu.run_until(None)
        stored = torch.cat([w.engine.storage_manager.puts[k] for k in ("100:0", "104:4")], dim=2)
        return {"stored": stored, "expected": expected}

    fenced = next_step_reuses_the_blocks({"r1"})
    assert torch.equal(fenced["stored"], fenced["expected"]) and fenced["stored"].abs().sum() > 0
    w.gpu.go.clear()
    unfenced = next_step_reuses_the_blocks(set())  # a fence that does not name r1: the hazard it prevents
    assert not torch.equal(unfenced["stored"], unfenced["expected"])
