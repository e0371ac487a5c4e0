"""The benchmark's own code, run end to end against simulated engines (its numbers mean nothing here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import REPO_ROOT, free_ports

from kvdemo import bench
from kvdemo.bench.cases import BLEND_CASES, CASES, cases_for
from kvdemo.bench.model_meta import meta_fields, model_meta
from kvdemo.bench.share_cases import SHARE_CASES
from kvdemo.config import SCENARIO_NAMES
from kvdemo.errors import UserFacingError

BLEND_CASE_KEYS = {"context_tokens", "n_chunks", "plain_cold_ttft_s", "plain_prefix_hit_ttft_s",
                   "plain_reordered_ttft_s", "blend_cold_ttft_s", "blend_same_order_ttft_s", "blend_reordered_ttft_s",
                   "blend_decode_tok_s", "plain_decode_tok_s"}
SHARE_CASE_KEYS = {"context_tokens", "a_cold_ttft_s", "b_after_a_ttft_s", "plain_a_ttft_s", "plain_b_ttft_s",
                   "lmcache_decode_tok_s", "plain_decode_tok_s", "store_bytes", "b_after_a_cold_store_ttft_s",
                   "b_load_gb_s", "b_after_a_over_plain_a", "a_cold_over_plain_a", "b_cold_store_over_plain_a"}
TOP_KEYS = {"device", "versions", "model", "weights", "command", "cases", "startup_s"}


def _run(tmp_path, *flags: str) -> dict:
    n = 5 if "share" in flags else 3
    ports = free_ports(n)
    return bench.run(["--simulate", "--sim-speed", "8", "--repeats", "2", "--decode-tokens", "16",
                      "--port", str(ports[0]), "--engine-ports", ",".join(map(str, ports[1:])),
                      "--out", str(tmp_path / "out"), "--log-dir", str(tmp_path / "logs"), *flags])


@pytest.mark.slow
def test_blend_bench_writes_json_and_png_with_the_issue_keys(tmp_path):
    result = _run(tmp_path, "--contexts", "4000,12000", "--skip-app-question")
    written = json.loads((tmp_path / "out" / "blend-simulated.json").read_text())
    assert (tmp_path / "out" / "blend-simulated.png").stat().st_size > 10_000
    assert written == json.loads(json.dumps(result))
    assert TOP_KEYS <= set(written) and written["weights"] == "simulated" and written["simulated"] is True
    assert [c["context_target"] for c in written["cases"]] == [4000, 12000]
    for case in written["cases"]:
        assert BLEND_CASE_KEYS <= set(case)
        assert abs(case["context_tokens"] - case["context_target"]) < 64
        assert len(case["repeats"]) == 2
    big = written["cases"][1]
    # the simulator's model: reordered chunks hit LMCache but not plain vLLM's prefix cache
    assert big["blend_reordered_ttft_s"] < big["plain_reordered_ttft_s"]
    assert big["plain_prefix_hit_ttft_s"] < big["plain_cold_ttft_s"]


@pytest.mark.slow
def test_share_bench_measures_b_after_a(tmp_path):
    written = _run(tmp_path, "--scenario", "share", "--contexts", "8000", "--kv-store-dir", str(tmp_path / "kv"),
                   "--skip-app-question")
    assert (tmp_path / "out" / "share-simulated.png").exists()
    case = written["cases"][0]
    assert SHARE_CASE_KEYS <= set(case)
    assert case["b_after_a_ttft_s"] < case["a_cold_ttft_s"]
    assert all(r["b_cached_tokens"] > 0.9 * r["context_tokens"] for r in case["repeats"])
    # the cold-store request: A stored a second document, its files were dropped from the page cache
    assert case["b_after_a_cold_store_ttft_s"] is not None
    assert all(r["cold_store_drop"]["files"] > 0 and r["cold_store_drop"]["bytes"] > 0 for r in case["repeats"])
    # engine B's load lines travel with the result (one per request B answered from the shared store)
    assert any("Retrieved" in line and "shared store" in line and "SIMULATED" in line
               for line in written["b_load_log"])


def test_every_scenario_has_its_protocol():
    """The bench picks the protocol by scenario name (a scenario knows nothing of the bench)."""
    assert tuple(CASES) == SCENARIO_NAMES
    assert cases_for("blend") is BLEND_CASES and cases_for("share") is SHARE_CASES
    with pytest.raises(UserFacingError, match="Unknown scenario 'nope'"):
        cases_for("nope")


def test_simulated_results_never_go_to_benchmarks_results():
    with pytest.raises(UserFacingError, match="GPU measurements only"):
        bench.run(["--simulate"])


def test_gpu_slug():
    assert bench.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.gpu_slug("NVIDIA H200") == "h200"


@pytest.mark.parametrize(("layout", "text"), [
    ([{"engine": "lmcache", "gpu": 0, "shared": True}, {"engine": "plain", "gpu": 0, "shared": True}],
     "2 engines on 1 GPU"),
    ([{"engine": "lmcache", "gpu": 0, "shared": False}, {"engine": "plain", "gpu": 1, "shared": False}],
     "2 engines on 2 GPUs"),
    ([{"engine": f"e{i}", "gpu": i % 2, "shared": True} for i in range(4)], "4 engines on 2 GPUs"),
    ([{"engine": "lmcache", "gpu": None, "shared": False}], ""),  # simulated: no GPU
    ([], ""),
])
def test_plot_titles_say_how_engines_sat_on_gpus(layout, text):
    assert bench.layout_text({"gpu_layout": layout}) == text


def test_pipeline_line_gives_b_load_rates():
    from kvdemo.bench.share_cases import pipeline_figures

    line = ("(EngineCore pid=9) INFO 11-28 09:39:07 [kvdemo] kvdemo pipeline: [req_id=cmpl-kvdemo-abc123-0-8f2e] "
            "retrieved 16128 of 16128 required tokens (2.114 GB) in 95.2 ms (22.2 GB/s), 8 groups; waited 12.5 ms "
            "for reads, 52.9 ms copying to the GPU")
    got = pipeline_figures(["noise", line], "kvdemo-abc123")
    assert got == {"tokens": 16128, "gb": 2.114, "total_ms": 95.2, "wait_ms": 12.5, "copy_ms": 52.9,
                   "copy_gb_s": 39.96, "total_gb_s": 22.21}
    assert pipeline_figures([line], "kvdemo-other") is None and pipeline_figures([line], None) is None


def test_store_lines_give_what_storing_cost_a():
    from kvdemo.bench.share_cases import store_figures

    sync = [f"(EngineCore pid=9) [2026-12-06 10:00:0{i}] LMCache INFO: [req_id=cmpl-kvdemo-a1-0-77aa] Stored 8192 "
            f"out of total 8192 tokens. size: 1.0000 GB, cost 44.6000 ms, throughput: 22.4215 GB/s; offload_time: "
            f"42.9000 ms, put_time: 1.7000 ms" for i in range(2)]
    got = store_figures(["noise", *sync], "kvdemo-a1")
    assert got == {"mode": "sync", "steps": 2, "tokens": 16384, "gb": 2.1475, "step_ms": 89.2, "copy_ms": 85.8,
                   "copy_gb_s": 25.03}
    fast = ("INFO 12-06 10:00:01 [kvdemo] kvdemo async_save: [req_id=cmpl-kvdemo-a2-0-1b] stored 8192 of 8192 "
            "tokens (1.074 GB): the step paid 2.5 ms, the copy took 20.0 ms (53.7 GB/s) on the GPU and was done "
            "21.0 ms after it was enqueued, put 1.2 ms")
    unknown = fast.replace("20.0 ms (53.7 GB/s)", "? ms")
    assert store_figures([fast, fast], "kvdemo-a2") == {"mode": "async", "steps": 2, "tokens": 16384, "gb": 2.148,
                                                        "step_ms": 5.0, "copy_ms": 40.0, "copy_gb_s": 53.7}
    assert store_figures([fast, unknown], "kvdemo-a2")["copy_ms"] is None
    assert store_figures(sync, "kvdemo-other") is None and store_figures(sync, None) is None


@pytest.mark.slow
def test_blend_bench_carries_the_model_dirs_provenance(tmp_path):
    """A model made by ``python -m kvdemo.models`` has kvdemo_model.json; the speed result carries it."""
    model = tmp_path / "model"
    shutil.copytree(REPO_ROOT / "kvdemo" / "assets" / "sim_tokenizer", model)
    (model / "config.json").write_text(json.dumps({"model_type": "mistral", "max_position_embeddings": 32768}))
    (model / "kvdemo_model.json").write_text(json.dumps({"model_sha256": "cd" * 32,
                                                         "gguf": {"general.name": "tiny"}}))
    result = _run(tmp_path, "--model", str(model), "--contexts", "4000", "--skip-app-question")
    assert result["model_sha256"] == "cd" * 32 and result["model_meta"]["gguf"]["general.name"] == "tiny"
    assert result["model_meta_file"] == str(model / "kvdemo_model.json")


def test_model_meta_fields():
    assert meta_fields(None) == {}
    assert meta_fields((Path("m.json"), {"a": 1})) == {"model_meta_file": "m.json", "model_meta": {"a": 1}}
    with pytest.raises(UserFacingError, match="--model-meta /nonexistent.json: no such file"):
        model_meta("x", "/nonexistent.json")
