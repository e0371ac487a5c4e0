"""Speed fix 'pipeline': a retrieve from the shared store copies chunks to the GPU while the next ones are read."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

from . import pipelined_load
from .hooks import copied_version_matches, find_target, logger, wrap_method
from .targets import MOD_CACHE_ENGINE


def patch_pipelined_retrieve(module: ModuleType) -> None:
    """Wrap ``LMCacheEngine.retrieve`` (the non-layerwise load of the KV-sharing scenario) to pipeline it.

    :mod:`.pipelined_load` copies each group of chunks while later groups are read, with the same prefix,
    stats and release rules. Configurations it does not cover (async loading, first-rank-only saving,
    remove-after-retrieve, passive ranks, an unhealthy engine) take LMCache's own retrieve unchanged.
    WHY: LMCache 0.5.3 reads every chunk (2 GB at 16K tokens) and only then copies them all to the GPU.
    """
    if find_target(module, "LMCacheEngine.retrieve", "pipeline") is None or \
            not copied_version_matches("pipeline", "LMCacheEngine.retrieve"):
        return

    def make(original: Any) -> Any:
        def retrieve(self: Any, tokens: Any, mask: Any = None, **kwargs: Any) -> Any:
            if not pipeline_applies(self):
                return original(self, tokens, mask, **kwargs)
            return pipelined_retrieve(self, tokens, mask, kwargs)
        return retrieve

    wrap_method(module, "LMCacheEngine.retrieve", "pipeline", make,
                f"copies each group of {pipelined_load.DEFAULT_GROUP_CHUNKS} chunks to the GPU while the next "
                "groups are read")


def pipeline_applies(engine: Any) -> bool:
    """Whether this retrieve is one the pipelined path reproduces exactly (else LMCache's own runs)."""
    if engine.gpu_connector is None or engine.storage_manager is None or not engine.is_healthy():
        return False
    return not any(getattr(engine, flag, False)
                   for flag in ("async_loading", "save_only_first_rank", "remove_after_retrieve", "use_layerwise"))


class EngineChunkIO:
    """:class:`kvdemo.pipelined_load.ChunkIO` over an LMCacheEngine, for one retrieve call."""

    def __init__(self, engine: Any, kwargs: dict) -> None:
        self.engine, self.kwargs = engine, kwargs

    def fetch(self, keys: list[Any], location: str) -> list[Any]:
        return self.engine.storage_manager.batched_get(keys=keys, location=location)

    def to_gpu(self, objs: list[Any], starts: list[int], ends: list[int]) -> None:
        self.engine.gpu_connector.batched_to_gpu(objs, starts, ends, **self.kwargs)

    def size(self, obj: Any) -> int:
        return int(obj.get_size())

    def release_copied(self, obj: Any) -> None:
        if obj.is_pinned:
            obj.unpin()
        obj.ref_count_down()

    def release_unused(self, obj: Any) -> None:
        obj.ref_count_down()


def retrieve_block_mapping(engine: Any, tokens: Any, mask: Any, kwargs: dict) -> list[tuple[str, list[Any]]]:
    """(location, [(key, start, end)]) in token order, exactly as LMCache's ``_process_tokens_internal``."""
    chunk_infos = [(key, start, end) for start, end, key in engine.token_database.process_tokens(
        tokens=tokens, mask=mask, request_configs=kwargs.get("request_configs"))]
    pins = engine.lookup_pins.get(kwargs["req_id"]) if "req_id" in kwargs else None
    if pins is not None and len(pins) == 1:
        return [(next(iter(pins)), chunk_infos)]
    return list(engine.storage_manager.get_block_mapping(chunk_infos).items())


def retrieve_readers(engine: Any) -> ThreadPoolExecutor:
    """The engine's reader threads (created on its first pipelined retrieve)."""
    readers = getattr(engine, "_kvdemo_readers", None)
    if readers is None:
        readers = ThreadPoolExecutor(pipelined_load.DEFAULT_READERS, thread_name_prefix="kvdemo-kv-read")
        engine._kvdemo_readers = readers
    return readers


def pipelined_retrieve(engine: Any, tokens: Any, mask: Any, kwargs: dict) -> Any:
    """LMCache's retrieve with reads and host→device copies overlapped; returns the same CPU bool mask."""
    import torch  # only ever called inside a vLLM worker

    req_id = kwargs.get("req_id", "unspecified")
    num_required = int(torch.sum(mask).item()) if mask is not None else len(tokens)
    check_log = getattr(engine, "_log_kvcache_for_check", None)  # LMCache's optional "KVCache Check" lines
    if check_log is not None:
        check_log(operation="retrieve", kwargs=kwargs, token_count=num_required, require_req_id=True)
    stats = engine.stats_monitor.on_retrieve_request(num_required)
    ret_mask = torch.zeros(len(tokens), dtype=torch.bool, device="cpu")
    with torch.inference_mode():  # as LMCache's retrieve (a decorator there)
        report = pipelined_load.load_in_groups(retrieve_block_mapping(engine, tokens, mask, kwargs),
                                               EngineChunkIO(engine, kwargs), retrieve_readers(engine))
    for _, start, end in report.loaded:
        ret_mask[start:end] = True
    stats.process_tokens_time += report.total_s - report.copy_s
    stats.to_gpu_time += report.copy_s
    retrieved = torch.sum(ret_mask)
    engine.stats_monitor.on_retrieve_finished(stats, retrieved)
    logger.info("kvdemo pipeline: [req_id=%s] retrieved %d of %d required tokens (%.3f GB) in %.1f ms "
                "(%.1f GB/s), %d groups; waited %.1f ms for reads, %.1f ms copying to the GPU", req_id,
                int(retrieved), num_required, report.bytes_loaded / 1e9, report.total_s * 1e3,
                report.bytes_loaded / report.total_s / 1e9 if report.total_s > 0 else 0.0, report.groups,
                report.wait_s * 1e3, report.copy_s * 1e3)
    return ret_mask


PATCHES = ((MOD_CACHE_ENGINE, patch_pipelined_retrieve),)
