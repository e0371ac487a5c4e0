"""Tracing one blend: the trace summary's arithmetic, the plugin's arm file, and the bench's trace request."""

from __future__ import annotations

import asyncio
import gzip
import json
import types

import pytest
from conftest import make_runtime

from kvdemo import bench, trace_summary
from kvdemo import vllm_plugin as vp
from kvdemo.client import RequestStats
from kvdemo.errors import UserFacingError
from kvdemo.lmcache_patches import hooks as plugin_hooks
from kvdemo.lmcache_patches import targets, trace
from kvdemo.runtime import EngineHandle


def _x(name: str, cat: str, ts: float, dur: float, **args) -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "args": args}


# Microseconds, as in Kineto traces: compute kernels on stream 7, H2D copies on stream 13.
EVENTS = [
    _x("kvdemo.blend", "user_annotation", 0, 900),
    _x("cudaStreamSynchronize", "cuda_runtime", 880, 20),
    _x("cudaLaunchKernel", "cuda_runtime", 10, 5),
    _x("ampere_gemm", "kernel", 100, 300, stream=7),  # 100-400
    _x("flash_fwd", "kernel", 350, 150, stream=7),  # 350-500 (overlaps the gemm: union 100-500)
    _x("Memcpy HtoD (Pinned -> Device)", "gpu_memcpy", 300, 400, stream=13, bytes=8_000_000),  # 300-700
    _x("Memcpy HtoD (Pageable -> Device)", "gpu_memcpy", 800, 100, stream=13, bytes=2_000_000),  # 800-900
    _x("Memcpy DtoD (Device -> Device)", "gpu_memcpy", 950, 50, stream=7),  # 950-1000
    {"ph": "i", "name": "marker", "ts": 5},  # instant events are ignored
]


def test_summary_of_compute_copy_overlap_idle_and_waits() -> None:
    s = trace_summary.summarize(EVENTS)
    assert s["cpu_blend_ms"] == 0.9
    assert s["gpu_span_ms"] == 0.9  # 100 .. 1000 us
    assert s["gpu_end_after_cpu_blend_end_ms"] == 0.1
    assert s["kernel_busy_ms"] == 0.4  # union 100-500
    assert s["h2d_copy_busy_ms"] == 0.5  # 300-700 + 800-900
    assert s["h2d_overlapped_with_kernels_ms"] == 0.2  # 300-500
    assert s["h2d_overlap_share"] == 0.4
    assert s["gpu_idle_ms"] == pytest.approx(0.15)  # 700-800 and 900-950
    assert s["other_copy_busy_ms"] == 0.05
    assert s["h2d_bytes"] == 10_000_000 and s["h2d_gb_per_s"] == 20.0
    assert s["h2d_copies"] == 2 and s["h2d_pageable_copies"] == 1 and s["kernels"] == 2
    assert s["host_waits"] == {"cudaStreamSynchronize": {"count": 1, "ms": 0.02}}
    assert s["stream_busy_ms"] == {"13": 0.5, "7": 0.45}
    assert [k["name"] for k in s["top_kernels"]] == ["ampere_gemm", "flash_fwd"]


def test_merge_and_intersection() -> None:
    assert trace_summary.merge([(5, 6), (0, 2), (1, 3)]) == [(0, 3), (5, 6)]
    assert trace_summary.intersection([(0, 3), (5, 6)], [(2, 5.5)]) == 1.5
    assert trace_summary.intersection([], [(0, 1)]) == 0


def test_summary_reads_gzipped_trace_files(tmp_path, capsys) -> None:
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": EVENTS}, f)
    assert trace_summary.load_events(path) == EVENTS
    assert trace_summary.main([str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["kernel_busy_ms"] == 0.4


# --------------------------------------------------------------------------------------------------
# Plugin: KVDEMO_TRACE_DIR arms one traced blend at a time
# --------------------------------------------------------------------------------------------------


def test_blend_is_traced_only_when_armed(tmp_path, monkeypatch) -> None:
    calls: list[tuple] = []

    class LMCBlender:
        def blend(self, tokens, mask=None, **kwargs):
            calls.append(("blend", len(tokens), kwargs))
            return "blended"

    traced: list[tuple] = []

    def fake_traced_call(call, trace_dir, label, n_tokens):
        traced.append((trace_dir, label, n_tokens))
        return call()

    monkeypatch.setattr(trace, "traced_call", fake_traced_call)
    module = types.SimpleNamespace(__name__="lmcache.v1.compute.blend.blender", LMCBlender=LMCBlender)
    trace.patch_blend_trace(module, trace_dir=tmp_path)
    trace.patch_blend_trace(module, trace_dir=tmp_path)  # idempotent: one wrapper
    blender = LMCBlender()

    assert blender.blend([1, 2, 3], slot_mapping="s") == "blended"
    assert traced == []
    (tmp_path / "arm").write_text("trace-16000/../x y\n")
    assert blender.blend([1] * 5) == "blended"
    assert traced == [(tmp_path, "trace-16000..xy", 5)]  # label cleaned to a safe file name
    assert not (tmp_path / "arm").exists()
    assert blender.blend([1]) == "blended" and len(traced) == 1  # one trace per arming
    assert [c[1] for c in calls] == [3, 5, 1] and calls[0][2] == {"slot_mapping": "s"}


def test_register_arms_tracing_from_the_environment(tmp_path, monkeypatch) -> None:
    hooks: list[str] = []
    monkeypatch.setattr(plugin_hooks, "when_imported", lambda name, cb: hooks.append(name))
    monkeypatch.setattr(plugin_hooks, "module_available", lambda name: True)
    monkeypatch.setenv(vp.ENV_ENABLE, "1")
    monkeypatch.setenv(vp.ENV_FIXES, "none")
    monkeypatch.setenv(vp.ENV_TRACE_DIR, str(tmp_path))
    vp._reset_for_tests()
    try:
        vp.register()
    finally:
        vp._reset_for_tests()
    assert hooks == [targets.MOD_BLENDER]


# --------------------------------------------------------------------------------------------------
# Bench: one extra traced request per context
# --------------------------------------------------------------------------------------------------


class PluginPlayingClient:
    """Stands in for the LMCache engine's client and plays the plugin's part: a blended question that
    arrives while the arm file exists consumes it and writes a trace and its summary."""

    def __init__(self, trace_dir, log: list) -> None:
        self.trace_dir, self.log = trace_dir, log

    async def complete(self, ids, max_tokens=1, skip_save=False, **kw):
        arm = self.trace_dir / "arm"
        armed = arm.exists()
        self.log.append({"n": len(ids), "skip_save": skip_save, "armed": armed})
        if armed and skip_save:
            label = arm.read_text()
            arm.unlink()
            (self.trace_dir / f"{label}.json.gz").write_bytes(b"trace")
            (self.trace_dir / f"{label}-summary.json").write_text(json.dumps(
                {"label": label, "blend_tokens": len(ids), "trace": f"{label}.json.gz", "kernel_busy_ms": 1.0}))
        return "", RequestStats(ttft_s=0.5 if armed else 0.2, total_s=0.6, completion_tokens=1,
                                prompt_tokens=len(ids))

    async def close(self) -> None:
        pass


def test_run_trace_arms_exactly_the_traced_request(builder, tmp_path, monkeypatch) -> None:
    runtime = make_runtime(builder)
    log: list[dict] = []
    client = PluginPlayingClient(tmp_path, log)
    monkeypatch.setattr(EngineHandle, "client", lambda self, timeout_s=600.0: client)
    result = asyncio.run(bench.run_trace(runtime, 6000, "t1", tmp_path, timeout_s=5))

    assert [e["armed"] for e in log].count(True) == 1 and log[-1]["armed"]  # the last request only
    assert log[-1]["skip_save"] and log[-2]["skip_save"] and not log[-2]["armed"]  # warm question before it
    assert all(not e["skip_save"] for e in log[:-2])  # precompute of the fresh chunks
    assert abs(log[-1]["n"] - 6000) < 64
    assert result["untraced_ttft_s"] == 0.2 and result["traced_ttft_s_includes_profiler"] == 0.5
    assert result["label"] == "trace-6000" and result["kernel_busy_ms"] == 1.0


def test_run_trace_says_when_no_trace_appears(builder, tmp_path, monkeypatch) -> None:
    runtime = make_runtime(builder)
    client = PluginPlayingClient(tmp_path / "elsewhere", [])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setattr(EngineHandle, "client", lambda self, timeout_s=600.0: client)
    with pytest.raises(UserFacingError, match="no blend trace"):
        asyncio.run(bench.run_trace(runtime, 4000, "t2", tmp_path, timeout_s=0.5))


def test_trace_needs_real_engines() -> None:
    with pytest.raises(UserFacingError, match="real LMCache engine"):
        bench.run(["--simulate", "--trace-contexts", "16000", "--out", "/tmp/x"])


@pytest.mark.parametrize("flags", [["--contexts", "8k"], ["--contexts", "0"], ["--trace-contexts", "16000,x"]])
def test_bad_token_counts_are_one_line_errors(flags) -> None:
    with pytest.raises(UserFacingError, match="token counts separated by commas"):
        bench.run(["--simulate", "--out", "/tmp/x", *flags])
