"""What LMCache did for one answer, read from the line its engine wrote for that request.

The app sends every request with its own ``X-Request-Id``; vLLM names the request
``cmpl-<id>-0-<random>``, and the LMCache engine (the plugin in a real engine, the simulator otherwise)
appends one JSON line per request it loads KV for to ``<log dir>/telemetry/<engine>/lmcache-<pid>.jsonl``
(kvdemo.lmcache_patches.telemetry has the fields). Per request, not from counter deltas: several visitors
ask at once. No line for a request means LMCache loaded nothing for it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def record_mode(raw: dict[str, Any]) -> str:
    """A record's "blend" or "retrieve" (``mode``; ``path`` in records written before the rename)."""
    return str(raw.get("mode", raw.get("path", "")))


@dataclass(frozen=True)
class LoadRecord:
    """One request's LMCache load, as the engine recorded it."""

    prompt_tokens: int
    hit_tokens: int  # tokens LMCache had (chunks + system prompt)
    vllm_prefix_tokens: int  # of those, already in vLLM's prefix cache
    loaded_tokens: int
    kv_bytes_loaded: int | None
    recomputed_tokens: int | None  # picked by the blender at its check layer (None: no blend)
    load_gpu_ms: float | None  # GPU time of the load (+ recompute when blending)
    load_host_ms: float | None
    mode: str  # "blend" or "retrieve" (LMCache loaded without blending)
    simulated: bool = False

    @property
    def fresh_tokens(self) -> int:
        """Prompt tokens after the hit (the question, typically): computed by vLLM as usual."""
        return max(0, self.prompt_tokens - self.hit_tokens)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LoadRecord:
        return cls(prompt_tokens=int(raw["prompt_tokens"]), hit_tokens=int(raw["lmcache_hit_tokens"]),
                   vllm_prefix_tokens=int(raw.get("vllm_prefix_tokens") or 0),
                   loaded_tokens=int(raw["loaded_tokens"]), kv_bytes_loaded=raw.get("kv_bytes_loaded"),
                   recomputed_tokens=raw.get("recomputed_tokens"), load_gpu_ms=raw.get("load_gpu_ms"),
                   load_host_ms=raw.get("load_host_ms"),
                   mode=record_mode(raw),
                   simulated=bool(raw.get("simulated", False)))

    def summary(self) -> str:
        """One line for the page: what was reused, recomputed and computed fresh, and the load."""
        parts = [f"LMCache reused {self.loaded_tokens:,} tokens"]
        if self.recomputed_tokens is not None and self.mode == "blend":
            share = self.recomputed_tokens / self.hit_tokens if self.hit_tokens else 0.0
            parts.append(f"recomputed {self.recomputed_tokens:,} ({share:.0%})")
        parts.append(f"computed {self.fresh_tokens:,} fresh")
        load = []
        if self.kv_bytes_loaded:
            load.append(f"{self.kv_bytes_loaded / 1e9:.2f} GB KV loaded")
        ms = self.load_gpu_ms if self.load_gpu_ms is not None else self.load_host_ms
        if ms is not None:
            what = "load + recompute" if self.mode == "blend" else "load"
            load.append(f"{what} {ms:.0f} ms" + (" GPU" if self.load_gpu_ms is not None else ""))
        text = ", ".join(parts) + (f" · {', '.join(load)}" if load else "")
        return text + (" (SIMULATED)" if self.simulated else "")


KEEP_RECORDS = 4096  # records read but not yet asked for, per engine


class TelemetryReader:
    """Finds request records in one engine's telemetry directory (read incrementally, engine-wide)."""

    def __init__(self, directory: Path, keep: int = KEEP_RECORDS) -> None:
        self.directory = directory
        self.keep = keep
        self._offsets: dict[Path, int] = {}
        # Records nobody asks for (precompute, warm-ups, other tools' requests) are dropped oldest first.
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # Several browser sessions read at once (each from a worker thread): one scan and lookup at a time.
        self._lock = threading.Lock()

    def _scan(self) -> None:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("lmcache-*.jsonl")):
            offset = self._offsets.get(path, 0)
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # whole lines only
            for line in data[:end].splitlines():
                try:
                    raw = json.loads(line)
                    self._records[str(raw["req_id"])] = raw
                except (ValueError, KeyError, TypeError):
                    continue
            self._offsets[path] = offset + end
        while len(self._records) > self.keep:
            self._records.popitem(last=False)

    def find(self, request_id: str, wait_s: float = 0.0, poll_s: float = 0.05) -> LoadRecord | None:
        """The record of the request the app sent as ``request_id`` (vLLM: ``cmpl-<id>-<n>-<random>``)."""
        prefix = f"cmpl-{request_id}-"
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                self._scan()
                key = next((k for k in self._records if k.startswith(prefix) or k == request_id), None)
                if key is not None:
                    return LoadRecord.from_json(self._records.pop(key))
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll_s)
