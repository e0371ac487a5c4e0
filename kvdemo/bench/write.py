"""The bench's output: the result JSON (with any raw traces beside it), a summary per case, and the PNG."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..scenarios import get_scenario

if TYPE_CHECKING:
    from .cli import BenchJob
    from .measure import Measured


def gpu_slug(name: str) -> str:
    words = re.sub(r"^NVIDIA\s+", "", name).split()
    return re.sub(r"[^a-z0-9]+", "-", words[0].lower()) if words else "gpu"


def layout_text(result: dict) -> str:
    """``2 engines on 1 GPU`` / ``4 engines on 2 GPUs`` from the result's ``gpu_layout``: the same bench
    on one or on two GPUs must not look alike on a plot."""
    layout = result.get("gpu_layout") or []
    gpus = {slot.get("gpu") for slot in layout if slot.get("gpu") is not None}
    if not layout or not gpus:
        return ""
    return f"{len(layout)} engines on {len(gpus)} GPU{'s' if len(gpus) > 1 else ''}"


def _title_device(result: dict) -> str:
    layout = layout_text(result)
    return f"{result['device']} ({layout})" if layout else result["device"]


def write(job: BenchJob, measured: Measured) -> Path:
    """Write <name>-<gpu>.json (raw traces beside it), print each case, draw the PNG; returns the JSON's path."""
    result, settings = measured.result, job.settings
    job.out.mkdir(parents=True, exist_ok=True)
    name = job.name or settings.scenario
    stem = f"{name}-{gpu_slug(result['device']) if not settings.simulate else 'simulated'}"
    path = job.out / f"{stem}.json"
    for t in result.get("traces", []):  # the raw trace travels with the result
        assert measured.trace_dir is not None
        kept = job.out / f"{stem}-{t['trace']}"
        shutil.copyfile(measured.trace_dir / t["trace"], kept)
        t["trace"] = kept.name
    if measured.trace_dir is not None:
        shutil.rmtree(measured.trace_dir, ignore_errors=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"kvdemo.bench: wrote {path}")
    for c in result["cases"]:
        print(job.cases.case_line(c))
    try:
        plot(result, path.with_suffix(".png"))
        print(f"kvdemo.bench: wrote {path.with_suffix('.png')}")
    except ImportError:
        print("kvdemo.bench: matplotlib missing here; draw the plot with --plot-only " + str(path))
    return path


def redraw(result_json: Path) -> dict:
    """--plot-only: draw the PNG of an existing result next to it (e.g. on a machine with matplotlib)."""
    result = json.loads(result_json.read_text())
    plot(result, result_json.with_suffix(".png"))
    print(f"kvdemo.bench: wrote {result_json.with_suffix('.png')}")
    return result


def plot(result: dict, png: Path) -> None:
    """The result's figure, as its scenario draws it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    get_scenario(result.get("scenario") or "blend").bench_cases().plot(result, png, plt)


def plot_blend(result: dict, png: Path, plt) -> None:
    cases = result["cases"]
    x = [c["context_tokens"] / 1000 for c in cases]
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"plain_cold_ttft_s": ("plain vLLM, cold", "tab:gray", "o--"),
              "plain_reordered_ttft_s": ("plain vLLM, chunks reordered", "tab:red", "o-"),
              "plain_prefix_hit_ttft_s": ("plain vLLM, same prefix (cache hit)", "tab:orange", "s:"),
              "blend_reordered_ttft_s": ("vLLM + LMCache blending, reordered", "tab:blue", "o-"),
              "blend_same_order_ttft_s": ("vLLM + LMCache blending, same order", "tab:cyan", "s:")}
    for key, (label, color, fmt) in styles.items():
        ax.plot(x, [c[key] for c in cases], fmt, color=color, label=label)
    for c, xi in zip(cases, x):
        ax.annotate(f"{c['speedup_reordered']:.2f}×", (xi, c["blend_reordered_ttft_s"]), textcoords="offset points",
                    xytext=(0, -14), ha="center", color="tab:blue", fontsize=9)
    ax.set_xlabel("context tokens (thousands), 8 chunks")
    ax.set_ylabel("time to first token (s), median")
    v = result["versions"]
    ax.set_title(f"{_title_device(result)} · {result['model_shape']} ({result['weights']} weights)\n"
                 f"vllm {v.get('vllm')} + lmcache {v.get('lmcache')}, torch {v.get('torch')}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_share(result: dict, png: Path, plt) -> None:
    cases = result["cases"]
    fig, ax = plt.subplots(figsize=(8, 5))
    labels = {"a_cold_ttft_s": ("LMCache A (cold, stores)", "tab:blue"),
              "b_after_a_ttft_s": ("LMCache B after A (loads)", "tab:cyan"),
              "plain_a_ttft_s": ("plain vLLM A", "tab:red"), "plain_b_ttft_s": ("plain vLLM B", "tab:orange")}
    width = 0.2
    for i, (key, (label, color)) in enumerate(labels.items()):
        xs = [j + (i - 1.5) * width for j in range(len(cases))]
        ax.bar(xs, [c[key] for c in cases], width, label=label, color=color)
    ax.set_xticks(range(len(cases)), [f"{c['context_tokens'] / 1000:.0f}K tokens" for c in cases])
    ax.set_ylabel("time to first token (s), median")
    v = result["versions"]
    ax.set_title(f"KV sharing · {_title_device(result)} · {result['weights']} weights\n"
                 f"vllm {v.get('vllm')} + lmcache {v.get('lmcache')}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
