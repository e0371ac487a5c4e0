"""Fix 'async_save' (off by default): storing a request's KV no longer delays the step that computed it.

LMCache 0.5.3 stores in vLLM's ``wait_for_save``, before the step returns and its token is sampled
(``LMCacheConnectorV1Impl.wait_for_save`` → ``LMCacheEngine.store``: allocate → ``batched_from_gpu``, one
``store_stream.synchronize()`` per chunk → ``batched_put``). Here ``store`` only allocates and *enqueues*
the copies; a worker thread (:mod:`.save_queue`) waits for them and puts. Only stores made by
``wait_for_save`` on the non-layerwise ``VLLMPagedMemGPUConnectorV2`` without MLA, KV events or a
disaggregation spec take this path; every other store is LMCache's own.

Ordering: the copies are enqueued before ``wait_for_save`` returns, on the store stream behind an event
recorded on the compute stream after the step's forward. vLLM reuses a request's blocks only after freeing
them, and names it in the next SchedulerOutput (``finished_req_ids``; preemption: ``preempted_req_ids``);
the metadata carries those ids to ``handle_preemptions``, called before that step's first kernel, which
blocks until their copies are complete (no ids: every copy). A running request never rewrites stored slots.
"""

from __future__ import annotations

import atexit
import functools
import threading
import time
from types import ModuleType
from typing import Any

from .hooks import copied_version_matches, find_target, logger, wrap_method
from .save_queue import SaveJob, SaveQueue
from .targets import MOD_ADAPTER, MOD_CACHE_ENGINE, MOD_VLLM_LMCACHE_CONNECTOR

FIX = "async_save"
# Set on the scheduler's connector metadata: requests whose blocks vLLM freed since the previous step.
FREED_ATTR = "kvdemo_freed_req_ids"
SHUTDOWN_TIMEOUT_S = 60.0


class _State:
    def __init__(self) -> None:
        self.fence_ready = False  # handle_preemptions is wrapped in this process: async stores are safe
        self.local = threading.local()  # .saving: inside LMCacheConnectorV1Impl.wait_for_save
        self.said_sync: set[str] = set()  # reasons already logged for taking LMCache's own store


STATE = _State()


class CudaOps:
    """The CUDA calls of the asynchronous store (the CPU tests put a fake GPU in :data:`GPU`)."""

    def current_stream(self) -> Any:
        import torch

        return torch.cuda.current_stream()

    def event(self, timing: bool = False) -> Any:
        import torch

        return torch.cuda.Event(enable_timing=timing)

    def use_stream(self, stream: Any) -> Any:
        import torch

        return torch.cuda.stream(stream)

    def transfer(self, *args: Any, **kwargs: Any) -> None:
        import lmcache.c_ops as lmc_ops

        lmc_ops.multi_layer_kv_transfer(*args, **kwargs)

    def d2h(self) -> Any:
        import lmcache.c_ops as lmc_ops

        return lmc_ops.TransferDirection.D2H

    def copy(self, dst: Any, src: Any) -> None:
        dst.copy_(src, non_blocking=True)

    def elapsed_s(self, start: Any, end: Any) -> float | None:
        return start.elapsed_time(end) / 1e3

    def inference_mode(self) -> Any:
        import torch

        return torch.inference_mode()

    def thread_initializer(self) -> Any:
        import torch

        return functools.partial(torch.cuda.set_device, torch.cuda.current_device())


GPU: Any = CudaOps()


def reset() -> None:
    """Forget this process's async_save state (tests)."""
    STATE.__init__()  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------------


def patch_store(module: ModuleType) -> None:
    """Wrap ``LMCacheEngine.store``: inside ``wait_for_save``, allocate and enqueue, then return."""
    if find_target(module, "LMCacheEngine.store", FIX) is None or \
            not copied_version_matches(FIX, "LMCacheEngine.store and VLLMPagedMemGPUConnectorV2.from_gpu"):
        return

    def make(original: Any) -> Any:
        def store(self: Any, tokens: Any = None, hashes: Any = None, offsets: Any = None, mask: Any = None,
                  **kwargs: Any) -> Any:
            if getattr(STATE.local, "saving", False) and async_applies(self, tokens, hashes, offsets, kwargs):
                with GPU.inference_mode():  # as LMCache's store (a decorator there)
                    return async_store(self, tokens, mask, kwargs)
            return original(self, tokens, hashes, offsets, mask, **kwargs)
        return store

    wrap_method(module, "LMCacheEngine.store", FIX, make,
                "enqueues the copies off the GPU and puts them after the step, on a worker thread")


def patch_adapter(module: ModuleType) -> None:
    """Mark ``wait_for_save`` (whose stores may go asynchronous) and give the worker the freed request ids."""
    if find_target(module, "LMCacheConnectorV1Impl.wait_for_save", FIX) is None or \
            not copied_version_matches(FIX, "LMCacheConnectorV1Impl.wait_for_save"):
        return

    def make_wait(original: Any) -> Any:
        def wait_for_save(self: Any) -> Any:
            STATE.local.saving = True
            try:
                return original(self)
            finally:
                STATE.local.saving = False
        return wait_for_save

    def make_meta(original: Any) -> Any:
        def build_connector_meta(self: Any, scheduler_output: Any) -> Any:
            meta = original(self, scheduler_output)
            freed = set(getattr(scheduler_output, "finished_req_ids", None) or ())
            freed |= set(getattr(scheduler_output, "preempted_req_ids", None) or ())
            setattr(meta, FREED_ATTR, frozenset(freed))
            return meta
        return build_connector_meta

    wrap_method(module, "LMCacheConnectorV1Impl.wait_for_save", FIX, make_wait)
    wrap_method(module, "LMCacheConnectorV1Impl.build_connector_meta", FIX, make_meta,
                "(wait_for_save's stores go asynchronous; the metadata names the requests vLLM freed)")


def patch_vllm_connector(module: ModuleType) -> None:
    """Wrap vLLM's ``LMCacheConnectorV1.handle_preemptions`` (the fence) and ``shutdown`` (the drain)."""
    def make_fence(original: Any) -> Any:
        def handle_preemptions(self: Any, kv_connector_metadata: Any) -> Any:
            fence(_engine_of(self), kv_connector_metadata)
            return original(self, kv_connector_metadata)
        return handle_preemptions

    def make_shutdown(original: Any) -> Any:
        def shutdown(self: Any) -> Any:
            drain(_engine_of(self))
            return original(self)
        return shutdown

    if wrap_method(module, "LMCacheConnectorV1.handle_preemptions", FIX, make_fence,
                   "(before each step: waits for the copies of requests whose blocks vLLM freed)"):
        STATE.fence_ready = True
    wrap_method(module, "LMCacheConnectorV1.shutdown", FIX, make_shutdown)


PATCHES = ((MOD_VLLM_LMCACHE_CONNECTOR, patch_vllm_connector), (MOD_ADAPTER, patch_adapter),
           (MOD_CACHE_ENGINE, patch_store))


# --------------------------------------------------------------------------------------------------
# The worker side
# --------------------------------------------------------------------------------------------------


def _engine_of(vllm_connector: Any) -> Any:
    impl = getattr(vllm_connector, "_lmcache_engine", None)
    return getattr(impl, "lmcache_engine", None)


def queue_of(engine: Any) -> SaveQueue:
    """The engine's save queue (created, with its worker thread, on its first asynchronous store)."""
    queue = getattr(engine, "_kvdemo_save_queue", None)
    if queue is None:
        queue = SaveQueue(initializer=GPU.thread_initializer())
        engine._kvdemo_save_queue = queue
        atexit.register(queue.close, SHUTDOWN_TIMEOUT_S)
    return queue


def fence(engine: Any, metadata: Any) -> int:
    """Block until the copies of the requests vLLM freed are complete (all pending ones when the metadata
    does not say which); returns how many stores it waited for."""
    queue = getattr(engine, "_kvdemo_save_queue", None)
    if queue is None:
        return 0
    freed = getattr(metadata, FREED_ATTR, None)
    return queue.fence(None if freed is None else freed)


def drain(engine: Any) -> None:
    """Finish every pending store (the worker's connector is shutting down)."""
    queue = getattr(engine, "_kvdemo_save_queue", None)
    if queue is not None and not queue.close(SHUTDOWN_TIMEOUT_S):
        logger.warning("kvdemo async_save: stores still running after %.0f s at shutdown", SHUTDOWN_TIMEOUT_S)


def async_applies(engine: Any, tokens: Any, hashes: Any, offsets: Any, kwargs: dict) -> bool:
    """Whether this store is one the asynchronous path reproduces (else LMCache's own store runs)."""
    connector = engine.gpu_connector
    reason = None
    if not STATE.fence_ready:
        reason = "vLLM's LMCacheConnectorV1.handle_preemptions could not be wrapped"
    elif tokens is None or hashes is not None or offsets is not None or \
            kwargs.get("transfer_spec") is not None:
        reason = "a store by hashes or with a disaggregation spec"
    elif type(connector).__name__ != "VLLMPagedMemGPUConnectorV2" or getattr(connector, "use_mla", False):
        reason = f"GPU connector {type(connector).__name__} (only VLLMPagedMemGPUConnectorV2 without MLA)"
    elif getattr(engine, "kv_events_enabled", False):
        reason = "KV events are enabled"
    elif getattr(getattr(engine, "_kvdemo_save_queue", None), "closed", False):
        reason = "the connector has shut down"
    elif engine.storage_manager is None or not engine.is_healthy() or engine._is_passive() or \
            engine.is_frozen():
        return False  # LMCache's store logs and skips these
    if reason is None:
        return True
    if reason not in STATE.said_sync:
        STATE.said_sync.add(reason)
        logger.info("kvdemo async_save: storing synchronously (LMCache's own store): %s", reason)
    return False


def async_store(engine: Any, tokens: Any, mask: Any, kwargs: dict) -> None:
    """LMCache 0.5.3's ``LMCacheEngine.store`` (cache_engine.py:430-558) up to the copies, which are enqueued;
    the put (cache_engine.py:560-589) follows on the engine's save queue."""
    started = time.perf_counter()
    req_id = engine._get_req_id(kwargs)
    num_to_store = int(mask.sum()) if mask is not None else len(tokens)
    engine._log_kvcache_for_check(operation="Store", kwargs=kwargs, token_count=num_to_store,
                                  require_req_id=False)
    stats = engine.stats_monitor.on_store_request(num_to_store)
    keys: list[Any] = []
    objs: list[Any] = []
    starts: list[int] = []
    ends: list[int] = []
    with stats.profile_process_tokens():
        for start, end, key in engine.token_database.process_tokens(
                tokens, None, None, mask, request_configs=kwargs.get("request_configs")):
            obj = engine.storage_manager.allocate(
                engine.metadata.get_shapes(end - start), engine.metadata.get_dtypes(),
                busy_loop=engine.config.get_extra_config_value("force_store_wait", False), fmt=engine.fmt)
            if obj is None:
                logger.warning("kvdemo async_save: local CPU memory under pressure; storing only %d chunks",
                               len(objs))
                break
            keys.append(key)
            objs.append(obj)
            starts.append(start)
            ends.append(end)
    if not objs:
        return
    with stats.profile_from_gpu():
        try:
            copy_started, done = enqueue_copies(engine.gpu_connector, objs, starts, ends, kwargs)
        except BaseException:
            _release(objs)
            raise
    job = SaveJob(req_id, done, put=lambda: None, release=functools.partial(_release, objs), keep=(kwargs,))
    report = {"tokens": sum(e - s for s, e in zip(starts, ends)), "required": num_to_store,
              "bytes": sum(obj.get_size() for obj in objs), "step_s": time.perf_counter() - started,
              "copy_started": copy_started}
    job.put = functools.partial(_put, engine, job, keys, objs, stats, report)
    queue_of(engine).submit(job)


def enqueue_copies(connector: Any, objs: list[Any], starts: list[int], ends: list[int],
                   kwargs: dict) -> tuple[Any, Any]:
    """Enqueue LMCache 0.5.3's ``VLLMPagedMemGPUConnectorV2.from_gpu`` (gpu_connectors.py:333-404) for each
    chunk on the connector's store stream, behind the compute stream's work, with no host synchronization;
    returns the (start, done) events recorded around them."""
    if "slot_mapping" not in kwargs:
        raise ValueError("'slot_mapping' should be provided in kwargs.")
    connector.initialize_kvcaches_ptr(**kwargs)
    assert connector.kvcaches is not None, "kvcaches should be provided in kwargs or initialized beforehand."
    slot_mapping = kwargs["slot_mapping"]
    pointers = connector._initialize_pointers(connector.kvcaches)
    stream, buffer = connector.store_stream, connector.gpu_buffer
    computed, copy_started, done = GPU.event(), GPU.event(timing=True), GPU.event(timing=True)
    computed.record(GPU.current_stream())
    device, d2h = connector.kvcaches[0].device, GPU.d2h()
    with GPU.use_stream(stream):
        stream.wait_event(computed)
        copy_started.record(stream)
        for obj, start, end in zip(objs, starts, ends):
            through_buffer = buffer is not None and end - start == buffer.shape[2]
            target = buffer[:, :, : end - start, :] if through_buffer else obj.tensor
            GPU.transfer(target, pointers, slot_mapping[start:end], device, connector.page_buffer_size, d2h,
                         connector.engine_kv_format, block_size=connector.block_size,
                         head_size=connector.head_size)
            if through_buffer:
                GPU.copy(obj.tensor, target)
        done.record(stream)
    return copy_started, done


def _put(engine: Any, job: SaveJob, keys: list[Any], objs: list[Any], stats: Any, report: dict) -> None:
    """The end of LMCache's store, on the worker thread once the copies are complete."""
    put_started = time.perf_counter()
    with stats.profile_put():
        engine.storage_manager.batched_put(keys, objs, transfer_spec=None, location=engine.store_location)
    engine.stats_monitor.on_store_finished(stats, report["tokens"])
    put_s = time.perf_counter() - put_started
    try:
        copy_s = GPU.elapsed_s(report["copy_started"], job.done)
    except Exception:  # noqa: BLE001 - timing only
        copy_s = None
    gb = report["bytes"] / 1e9
    after_s = (job.copied_at or put_started) - job.enqueued_at
    logger.info("kvdemo async_save: [req_id=%s] stored %d of %d tokens (%.3f GB): the step paid %.1f ms, the "
                "copy took %s on the GPU and was done %.1f ms after it was enqueued, put %.1f ms", job.req_id,
                report["tokens"], report["required"], gb, report["step_s"] * 1e3,
                f"{copy_s * 1e3:.1f} ms ({gb / copy_s:.1f} GB/s)" if copy_s else "? ms", after_s * 1e3,
                put_s * 1e3)


def _release(objs: list[Any]) -> None:
    for obj in objs:
        obj.ref_count_down()
