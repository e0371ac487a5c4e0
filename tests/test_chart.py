"""The pure pieces of the page's per-answer numbers: the stats line's reuse text and the TTFT chart's data."""

from __future__ import annotations

import json

import gradio as gr
import pandas as pd
import pytest
from conftest import make_runtime

from kvdemo.client import RequestStats
from kvdemo.ui.chart import (
    BENCHMARK_FILE,
    Benchmark,
    chart_caption,
    chart_frame,
    chart_title,
    colour_map,
    drawn,
    load_benchmark,
)
from kvdemo.ui.labels import reuse_text, stats_markdown
from kvdemo.ui.session import ChatState


def stats(cached: int | None, prompt: int = 18_031, ttft: float = 0.123) -> RequestStats:
    return RequestStats(ttft_s=ttft, total_s=ttft + 1.0, completion_tokens=51, prompt_tokens=prompt,
                        cached_tokens=cached)


# ----- the stats line ------------------------------------------------------------------------------

def test_reuse_text_names_where_the_tokens_came_from():
    assert reuse_text(stats(17_900), lmcache=True) == "**17,900** of 18,031 prompt tokens reused from LMCache"
    assert reuse_text(stats(80), lmcache=False) == "**80** of 18,031 prompt tokens reused from vLLM's prefix cache"
    assert reuse_text(stats(0), lmcache=False) == "**0** of 18,031 prompt tokens reused from vLLM's prefix cache"


@pytest.mark.parametrize("lmcache", [True, False])
def test_reuse_not_reported_is_not_guessed(lmcache):
    assert reuse_text(stats(None), lmcache) == "18,031 prompt tokens (reuse not reported)"


def test_stats_line(builder):
    from kvdemo.telemetry import LoadRecord

    sim = make_runtime(builder)
    line = stats_markdown(stats(17_900), sim, lmcache=True)
    assert line == ("TTFT **0.123 s** · decode 50 tok/s · **17,900** of 18,031 prompt tokens reused from LMCache "
                    "(SIMULATED)  \n🔎 LMCache's record of this request did not arrive (see the engine log)")
    load = LoadRecord(prompt_tokens=18_031, hit_tokens=17_950, vllm_prefix_tokens=0, loaded_tokens=17_900,
                      kv_bytes_loaded=17_900 * 131_072, recomputed_tokens=2_692, load_gpu_ms=141.2,
                      load_host_ms=None, mode="blend", simulated=True)
    assert stats_markdown(stats(17_900), sim, lmcache=True, load=load).endswith(
        "  \n🔎 LMCache reused 17,900 tokens, recomputed 2,692 (15%), computed 81 fresh · 2.35 GB KV loaded, "
        "load + recompute 141 ms GPU (SIMULATED)")
    assert stats_markdown(stats(0), sim, lmcache=True).endswith("🔎 LMCache loaded nothing for this answer "
                                                                 "(no stored chunk matched, or too few tokens to be worth "
                                                                 "loading: they were prefilled)")
    assert stats_markdown(stats(None), sim).endswith(" · 18,031 prompt tokens (reuse not reported) (SIMULATED)")
    assert stats_markdown(None, sim) == ""
    real = make_runtime(builder)
    real.settings.simulate = False
    assert stats_markdown(stats(80), real).endswith("**80** of 18,031 prompt tokens reused from vLLM's prefix cache")


# ----- the chart's data ----------------------------------------------------------------------------

def write_bench(path, **extra):
    data = {"device": "NVIDIA H100 80GB HBM3", "weights": "dummy", "cases": [
        {"context_tokens": 8000, "plain_reordered_ttft_s": 0.21, "blend_reordered_ttft_s": 0.13},
        {"context_tokens": 4000, "plain_reordered_ttft_s": 0.10, "blend_reordered_ttft_s": 0.12},
    ]}
    data.update(extra)
    path.write_text(json.dumps(data))
    return path


def session_state() -> ChatState:
    state = ChatState()
    for turn, (prompt, fast, slow) in enumerate([(18_031, 0.15, 0.52), (25_707, 0.21, 0.83)], start=1):
        state.turn = turn
        state.add_point("lmcache", stats(17_900, prompt, fast))
        state.add_point("plain", stats(80, prompt, slow))
        state.add_point("plain", stats(80, prompt, slow))  # reported again (every streamed step): one point
    return state


def test_load_benchmark(tmp_path):
    bench = load_benchmark(write_bench(tmp_path / "b.json"))
    assert bench == Benchmark("NVIDIA H100 80GB HBM3", "dummy", {"lmcache": [(4000, 0.12), (8000, 0.13)],
                                                                 "plain": [(4000, 0.10), (8000, 0.21)]}, "b.json")
    assert bench.short_device == "H100"
    assert bench.label() == "benchmark on NVIDIA H100 80GB HBM3 (dummy weights)"
    other = load_benchmark(write_bench(tmp_path / "c.json", device="Some Accelerator", weights=None))
    assert other.short_device == "Some Accelerator" and other.label() == "benchmark on Some Accelerator"


def test_the_committed_benchmark_loads():
    bench = load_benchmark(BENCHMARK_FILE)
    assert bench is not None and bench.short_device == "H100" and bench.weights == "dummy"
    assert [x for x, _ in bench.points["lmcache"]] == [x for x, _ in bench.points["plain"]]
    assert len(bench.points["plain"]) >= 4


@pytest.mark.parametrize("content", [None, "not json", "{}", '{"cases": [{"context_tokens": 4000}]}'])
def test_missing_or_unusable_benchmark(tmp_path, content):
    path = tmp_path / "blend-h100.json"
    if content is not None:
        path.write_text(content)
    assert load_benchmark(path) is None


def test_chart_frame_with_the_benchmark(tmp_path):
    bench = load_benchmark(write_bench(tmp_path / "b.json"))
    frame = chart_frame(session_state(), bench, simulated=True)
    assert list(frame.columns) == ["context_tokens", "ttft_s", "series"]
    assert frame.to_dict("records") == [  # grouped by series, in a fixed order
        {"context_tokens": 18_031, "ttft_s": 0.15, "series": "🚀 this session (SIMULATED)"},
        {"context_tokens": 25_707, "ttft_s": 0.21, "series": "🚀 this session (SIMULATED)"},
        {"context_tokens": 18_031, "ttft_s": 0.52, "series": "🐢 this session (SIMULATED)"},
        {"context_tokens": 25_707, "ttft_s": 0.83, "series": "🐢 this session (SIMULATED)"},
        {"context_tokens": 4000, "ttft_s": 0.12, "series": "🚀 benchmark (H100)"},
        {"context_tokens": 8000, "ttft_s": 0.13, "series": "🚀 benchmark (H100)"},
        {"context_tokens": 4000, "ttft_s": 0.10, "series": "🐢 benchmark (H100)"},
        {"context_tokens": 8000, "ttft_s": 0.21, "series": "🐢 benchmark (H100)"},
    ]
    assert set(colour_map(bench, True)) == set(frame["series"])  # every series has its colour
    assert "SIMULATED" in chart_title(True) and "SIMULATED" not in chart_title(False)
    assert "benchmark on NVIDIA H100 80GB HBM3 (dummy weights)" in chart_caption(bench)
    real = chart_frame(session_state(), bench, simulated=False)
    assert "🚀 this session" in set(real["series"]) and not real["series"].str.contains("SIMULATED").any()


def test_chart_frame_without_the_benchmark(tmp_path):
    frame = chart_frame(session_state(), load_benchmark(tmp_path / "missing.json"), simulated=True)
    assert len(frame) == 4 and set(frame["series"]) == {"🚀 this session (SIMULATED)", "🐢 this session (SIMULATED)"}
    assert "no benchmark file" in chart_caption(None)
    # A new session without the benchmark: nothing to draw, but both series are there (with their colours).
    empty = chart_frame(ChatState(), None, simulated=True)
    assert drawn(empty).empty and list(empty["series"]) == ["🚀 this session (SIMULATED)", "🐢 this session (SIMULATED)"]
    assert list(empty.columns) == ["context_tokens", "ttft_s", "series"]
    assert pd.api.types.is_integer_dtype(empty["context_tokens"]) and pd.api.types.is_float_dtype(empty["ttft_s"])


def test_every_series_is_in_the_frame_from_the_start(tmp_path):
    """Gradio's plot fixes its colour domain when it first draws: a series added later would not show."""
    bench = load_benchmark(write_bench(tmp_path / "b.json"))
    state = ChatState(turn=1)
    state.add_point("plain", stats(80, 18_031, 0.52))  # 🐢 answered, 🚀 not (failed, stopped or unticked)
    frame = chart_frame(state, bench, simulated=False)
    assert list(dict.fromkeys(frame["series"])) == ["🚀 this session", "🐢 this session", "🚀 benchmark (H100)",
                                                    "🐢 benchmark (H100)"]
    assert list(colour_map(bench, False)) == list(dict.fromkeys(frame["series"]))
    placeholder = frame[frame["series"] == "🚀 this session"]
    assert len(placeholder) == 1 and placeholder.isna().sum().sum() == 2  # no coordinates: not drawn
    assert len(drawn(frame)) == 5
    data = gr.ScatterPlot(x="context_tokens", y="ttft_s", color="series").postprocess(frame)
    assert data.data[0] == [None, None, "🚀 this session"]  # JSON null: vega-lite leaves it out
    assert data.datatypes == {"context_tokens": "quantitative", "ttft_s": "quantitative", "series": "nominal"}


def test_clear_forgets_the_points():
    state = session_state()
    state.clear()
    assert state.points == [] and drawn(chart_frame(state, None, simulated=False)).empty
    state.turn += 1
    state.add_point("plain", stats(80))
    assert len(state.points) == 1
