"""Where the GPU time of one traced blend goes: a summary of a torch-profiler (Kineto) Chrome trace.

Why: per-phase timers with CUDA syncs (``KVDEMO_PROFILE=1``) serialize exactly what should overlap
(loading layer i+1's KV over PCIe while layer i recomputes), so they cannot show whether it does. A
profiler trace records every kernel and copy with its stream and GPU timestamps without adding syncs;
this module reduces one to the numbers that answer the question: how long the GPU computed, how long it
copied host→device, how much of the two overlapped, how long it sat idle, and how long the host waited.

Pure Python on the trace's JSON (``traceEvents`` of ``torch.profiler.profile.export_chrome_trace``), so it
is tested on CPU and also runs inside the engine process right after a traced blend (kvdemo.vllm_plugin).
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BLEND_ANNOTATION = "kvdemo.blend"  # record_function name the plugin wraps a traced blend in
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
Interval = tuple[float, float]


def load_events(path: Path) -> list[dict[str, Any]]:
    """The ``traceEvents`` of a Chrome trace file (``.json`` or ``.json.gz``)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Union of [start, end) intervals as sorted, disjoint intervals."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def length(intervals: Iterable[Interval]) -> float:
    return sum(e - s for s, e in intervals)


def intersection(a: list[Interval], b: list[Interval]) -> float:
    """Total length covered by both of two merged interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _is_complete(e: dict[str, Any]) -> bool:
    return e.get("ph") == "X" and isinstance(e.get("ts"), (int, float)) and isinstance(e.get("dur"), (int, float))


def _is_h2d_copy(e: dict[str, Any]) -> bool:
    return e.get("cat") == "gpu_memcpy" and "HtoD" in str(e.get("name", ""))


def _span(e: dict[str, Any]) -> Interval:
    return float(e["ts"]), float(e["ts"]) + float(e["dur"])


def summarize(events: list[dict[str, Any]], top: int = 8) -> dict[str, Any]:
    """Milliseconds of GPU compute, host→device copy, their overlap, GPU idle and host waits.

    Times are in ms; the window is the ``kvdemo.blend`` annotation on the CPU when present, else the span
    of the GPU activity. ``gpu_idle_ms`` counts the gaps between the first and last GPU activity."""
    complete = [e for e in events if _is_complete(e)]
    gpu = [e for e in complete if e.get("cat") in GPU_CATEGORIES]
    kernels = [e for e in gpu if e.get("cat") == "kernel"]
    h2d = [e for e in gpu if _is_h2d_copy(e)]
    other_copies = [e for e in gpu if e.get("cat") != "kernel" and not _is_h2d_copy(e)]
    annotation = next((e for e in complete if e.get("name") == BLEND_ANNOTATION
                       and e.get("cat") in ("user_annotation", "cpu_op", "python_function")), None)

    kernel_union = merge(_span(e) for e in kernels)
    h2d_union = merge(_span(e) for e in h2d)
    all_union = merge(_span(e) for e in gpu)
    gpu_start = all_union[0][0] if all_union else 0.0
    gpu_end = all_union[-1][1] if all_union else 0.0
    h2d_bytes = sum(int((e.get("args") or {}).get("bytes", 0) or 0) for e in h2d)

    host_waits: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in complete:
        name = str(e.get("name", ""))
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "Synchronize" in name:
            host_waits[name][0] += 1
            host_waits[name][1] += float(e["dur"]) / 1e3

    per_stream: dict[str, list[Interval]] = defaultdict(list)
    for e in gpu:
        per_stream[str((e.get("args") or {}).get("stream", "?"))].append(_span(e))

    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_kernel[str(e.get("name", ""))[:90]][0] += 1
        by_kernel[str(e.get("name", ""))[:90]][1] += float(e["dur"]) / 1e3

    kernel_ms, h2d_ms = length(kernel_union) / 1e3, length(h2d_union) / 1e3
    overlap_ms = intersection(kernel_union, h2d_union) / 1e3
    summary: dict[str, Any] = {
        "cpu_blend_ms": float(annotation["dur"]) / 1e3 if annotation else None,
        "gpu_span_ms": (gpu_end - gpu_start) / 1e3,
        "gpu_end_after_cpu_blend_end_ms": (gpu_end - _span(annotation)[1]) / 1e3 if annotation and gpu else None,
        "kernel_busy_ms": kernel_ms,
        "h2d_copy_busy_ms": h2d_ms,
        "h2d_overlapped_with_kernels_ms": overlap_ms,
        "h2d_overlap_share": overlap_ms / h2d_ms if h2d_ms else None,
        "gpu_idle_ms": (gpu_end - gpu_start - length(all_union)) / 1e3,
        "other_copy_busy_ms": length(merge(_span(e) for e in other_copies)) / 1e3,
        "h2d_bytes": h2d_bytes,
        "h2d_gb_per_s": h2d_bytes / (h2d_ms * 1e6) if h2d_ms else None,
        "h2d_copies": len(h2d),
        "h2d_pageable_copies": sum("Pageable" in str(e.get("name", "")) for e in h2d),
        "kernels": len(kernels),
        "host_waits": {k: {"count": int(c), "ms": round(ms, 3)} for k, (c, ms) in sorted(host_waits.items())},
        "stream_busy_ms": {k: round(length(merge(v)) / 1e3, 3) for k, v in sorted(per_stream.items())},
        "top_kernels": [{"name": k, "count": int(c), "ms": round(ms, 3)}
                        for k, (c, ms) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:top]],
    }
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m kvdemo.trace_summary TRACE.json[.gz]``: print the summary as JSON."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m kvdemo.trace_summary", description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path)
    a = p.parse_args(argv)
    print(json.dumps(summarize(load_events(a.trace)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
