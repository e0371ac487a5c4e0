"""Per-request record of what LMCache did, for the app (``KVDEMO_TELEMETRY_DIR=DIR``).

"Did it blend at all?" needs figures per request: LMCache 0.5.3 flushes its Prometheus metrics every 10 s
(several visitors ask at once) and logs the blender's picked count at DEBUG without a request id. So the
connector's ``start_load_kv`` is wrapped: for each request it loads, one JSON line goes to
``DIR/lmcache-<pid>.jsonl`` with vLLM's request id (``cmpl-<X-Request-Id>-0-<random>``: the app sets the
header and finds its line, kvdemo.telemetry), ``mode`` ("blend", or "retrieve" without blending), the
tokens LMCache had (hit), the prefix vLLM already had, the tokens loaded and their KV bytes (tokens ×
LMCache's bytes per token), the tokens the blender picked to recompute at its check layer
(``LMCBlender.process_qkv``), and how long the load took: host time of the call, and GPU time between CUDA
events around it (blending: load + recompute of the hit tokens), the Python garbage collector's pauses
inside the call, and how many attention layers the exact mask computed (or fell back on LMCache's call).
The GPU time is read by a small thread once the end event completes, so the engine step never waits for it.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from . import mask
from .hooks import logger, wrap_method
from .targets import MOD_ADAPTER, MOD_BLENDER

ENV_TELEMETRY_DIR = "KVDEMO_TELEMETRY_DIR"
_write_lock = threading.Lock()


class GcPauses:
    """Milliseconds the garbage collector has paused this process so far (a ``gc.callbacks`` entry)."""

    def __init__(self) -> None:
        self.total_ms = 0.0
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.total_ms += (time.perf_counter() - self._started) * 1e3
            self._started = None

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)


gc_pauses = GcPauses()


def record_path(directory: Path, pid: int | None = None) -> Path:
    return directory / f"lmcache-{os.getpid() if pid is None else pid}.jsonl"


def write_record(directory: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (whole lines only: readers in the app never see half a record)."""
    line = json.dumps(record, separators=(",", ":")) + "\n"
    with _write_lock, record_path(directory).open("a", encoding="utf-8") as f:
        f.write(line)


def kv_bytes_per_token(engine: Any) -> int | None:
    """Bytes of KV LMCache moves per token (all layers, K and V), from the engine's metadata."""
    meta = getattr(engine, "metadata", None)
    if meta is None:
        return None
    try:
        total = 0
        for shape, dtype in zip(meta.get_shapes(1), meta.get_dtypes(), strict=True):
            n = 1
            for dim in shape:
                n *= int(dim)
            total += n * dtype.itemsize
        return total
    except Exception:  # noqa: BLE001 - an older metadata without groups: its legacy shape
        layers, kv, _, heads, head = meta.kv_shape
        return int(layers) * int(kv) * int(heads) * int(head) * meta.kv_dtype.itemsize


def loadable_requests(connector: Any) -> list[dict[str, Any]]:
    """The requests this step will load from LMCache, in the order ``start_load_kv`` loads them."""
    try:
        metadata = connector._parent._get_connector_metadata()
        requests = list(metadata.requests)
    except Exception:  # noqa: BLE001 - no metadata: nothing to record
        return []
    chunk = int(getattr(connector, "_lmcache_chunk_size", 256) or 256)
    found = []
    for request in requests:
        spec = getattr(request, "load_spec", None)
        if spec is None or not spec.can_load:
            continue
        hit = int(spec.lmcache_cached_tokens)
        vllm_prefix = int(spec.vllm_cached_tokens)
        found.append({"req_id": str(request.req_id), "prompt_tokens": len(request.token_ids),
                      "lmcache_hit_tokens": hit, "vllm_prefix_tokens": vllm_prefix,
                      "loaded_tokens": max(0, hit - vllm_prefix // chunk * chunk)})
    return found


def _cuda_events() -> tuple[Any, Any] | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        return start, end
    except Exception:  # noqa: BLE001 - no GPU timing; host time still recorded
        return None


def _finish(directory: Path, records: list[dict[str, Any]], events: tuple[Any, Any] | None) -> None:
    """Wait for the end event (off the engine's thread), add the GPU time, write the lines."""
    gpu_ms = None
    if events is not None:
        try:
            events[1].synchronize()
            gpu_ms = round(events[0].elapsed_time(events[1]), 3)
        except Exception:  # noqa: BLE001
            gpu_ms = None
    for record in records:
        record["load_gpu_ms"] = gpu_ms
        write_record(directory, record)
        logger.info("kvdemo telemetry: [req_id=%s] prompt %d, LMCache hit %d, vLLM prefix %d, loaded %d (%s bytes), "
                    "recomputed %s of %s, load host %.1f ms, GPU %s ms, GC %.1f ms, exact-mask layers %d "
                    "(fallback %d)", record["req_id"], record["prompt_tokens"],
                    record["lmcache_hit_tokens"], record["vllm_prefix_tokens"], record["loaded_tokens"],
                    record["kv_bytes_loaded"], record["recomputed_tokens"], record["blend_tokens"],
                    record["load_host_ms"], gpu_ms, record["gc_pause_ms"], record["exact_mask_layers"],
                    record["mask_fallback_layers"])


def patch_start_load_kv(module: ModuleType, directory: Path) -> None:
    """Wrap ``LMCacheConnectorV1Impl.start_load_kv`` to write one record per loaded request."""
    def make(original: Any) -> Any:
        def start_load_kv(self: Any, *args: Any, **kwargs: Any) -> Any:
            requests = loadable_requests(self)
            if not requests:
                return original(self, *args, **kwargs)
            blender = getattr(self, "blender", None)
            if blender is not None:
                blender._kvdemo_picked = []
            events = _cuda_events()
            gc_before, masked_before = gc_pauses.total_ms, dict(mask.layer_counts)
            t0 = time.perf_counter()
            result = original(self, *args, **kwargs)
            host_ms = round((time.perf_counter() - t0) * 1e3, 3)
            gc_ms = round(gc_pauses.total_ms - gc_before, 3)
            masked = {k: v - masked_before[k] for k, v in mask.layer_counts.items()}
            if events is not None:
                events[1].record()
            picked = list(getattr(blender, "_kvdemo_picked", None) or [])
            per_token = kv_bytes_per_token(getattr(self, "lmcache_engine", None))
            for i, record in enumerate(requests):
                record.update(mode="blend" if getattr(self, "enable_blending", False) else "retrieve",
                              recomputed_tokens=picked[i][0] if i < len(picked) else None,
                              blend_tokens=picked[i][1] if i < len(picked) else None,
                              kv_bytes_loaded=record["loaded_tokens"] * per_token if per_token else None,
                              load_host_ms=host_ms, gc_pause_ms=gc_ms, exact_mask_layers=masked["exact"],
                              mask_fallback_layers=masked["fallback"], requests_in_step=len(requests),
                              time=time.time())
            threading.Thread(target=_finish, args=(directory, requests, events), daemon=True,
                             name="kvdemo-telemetry").start()
            return result
        return start_load_kv

    wrap_method(module, "LMCacheConnectorV1Impl.start_load_kv", "telemetry", make,
                f"records each loaded request to {record_path(directory)}")


def patch_process_qkv(module: ModuleType) -> None:
    """Wrap ``LMCBlender.process_qkv``: at a check layer, note how many of how many tokens were picked."""
    def make(original: Any) -> Any:
        def process_qkv(self: Any, q: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(self, q, *args, **kwargs)
            layer_id = args[3] if len(args) > 3 else kwargs.get("layer_id")
            picked = getattr(self, "_kvdemo_picked", None)
            indices = getattr(getattr(self, "metadata", None), "imp_indices", None)
            if picked is not None and indices is not None and \
                    layer_id in getattr(self.common_metadata, "check_layers", ()):
                picked.append((int(indices.shape[0]), int(q.shape[0])))  # shapes: no GPU sync
            return result
        return process_qkv

    wrap_method(module, "LMCBlender.process_qkv", "telemetry", make, "notes the recomputed token count")


def arm(directory: str, when_imported: Callable[[str, Callable[[ModuleType], None]], None]) -> None:
    """Attach both wraps to their modules' imports (called by register() when the env names a directory)."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        logger.warning("kvdemo plugin: telemetry directory %s unusable (%s); no per-request records", path, exc)
        return
    gc_pauses.install()
    when_imported(MOD_ADAPTER, lambda module: patch_start_load_kv(module, path))
    when_imported(MOD_BLENDER, patch_process_qkv)
