"""The CLI's measurement: warm-up, baseline and blended repeats, and the record and report of their TTFTs.

Run protocol: warm-up (its own synthetic prompt: a full prefill, a precompute and a blended request, so
CUDA/JIT warm-up of both paths is not measured) → the prompt ``--repeats`` times before anything of it
is cached (full prefill; ``lmcache.skip_save`` so nothing is stored) → precompute ``[BOS]+sys`` and
``[BOS]+SEP+ci`` → the same prompt ``--repeats`` times, blended (also ``skip_save``, so every repeat
blends the same cached chunks). Medians of the repeats are reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, TextIO

from ..errors import UserFacingError
from ..preflight import package_version
from .plan import Plan
from .session import BlendSession
from .settings import PROG

log = logging.getLogger("kvdemo.offline")


def measure(session: BlendSession, plan: Plan, repeats: int) -> dict[str, Any]:
    """Warm-up, baseline (nothing cached), precompute, blended; every question run with skip_save."""
    warm_up_s = session.warm_up()
    baseline = [session.generate(plan.sys_prompt, plan.chunks, plan.question) for _ in range(repeats)]
    pre = session.precompute(plan.chunks, plan.sys_prompt)
    blended = [session.generate(plan.sys_prompt, plan.chunks, plan.question) for _ in range(repeats)]
    base_ttft = statistics.median(r.ttft_s for r in baseline)
    blend_ttft = statistics.median(r.ttft_s for r in blended)
    sources = sorted({r.ttft_source for r in baseline + blended})
    return {
        "baseline_ttft_s": base_ttft, "blended_ttft_s": blend_ttft,
        "speedup": base_ttft / blend_ttft if blend_ttft > 0 else None,
        "ttft_source": sources[0] if len(sources) == 1 else sources,
        "baseline_ttft_runs_s": [r.ttft_s for r in baseline],
        "blended_ttft_runs_s": [r.ttft_s for r in blended],
        "answer": blended[-1].text, "answer_tokens": blended[-1].output_tokens,
        "finish_reason": blended[-1].finish_reason, "baseline_answer": baseline[-1].text,
        "precompute": dataclasses.asdict(pre), "warm_up_s": warm_up_s, "startup_s": session.startup_s,
        "engine_max_model_len": session.max_model_len,
    }


def result_record(plan: Plan, args: argparse.Namespace, measured: dict[str, Any]) -> dict[str, Any]:
    dummy = plan.kwargs.get("load_format") == "dummy"
    record: dict[str, Any] = {
        "tool": PROG, "model": plan.model, "weights": "dummy" if dummy else "real",
        "device": plan.gpus[0].name if plan.gpus else None,  # the key benchmarks/results/*.json share
        "versions": {name: package_version(name) for name in ("vllm", "lmcache", "torch", "transformers")},
        "lmcache_config_file": str(plan.config_path), "lmcache_config": plan.lmcache_config,
        "engine_kwargs": plan.kwargs, "chunks": [str(p) for p in args.chunks], "question": plan.question,
        "prompt_tokens": plan.blend.breakdown(), "max_tokens": args.max_tokens, "repeats": args.repeats,
        **measured,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if dummy:
        record["note"] = "dummy weights: the answers are noise; the timings are real"
    return record


def print_report(record: dict[str, Any], out: TextIO) -> None:
    p = record["prompt_tokens"]
    print(f"{PROG}: {record['model']} ({record['weights']} weights), {len(p['chunks'])} chunk(s), "
          f"prompt {p['total']} tokens (system {p['system']}, chunks {sum(p['chunks'])}, "
          f"question {p['question']})", file=out)
    print(f"\nAnswer (blended):\n{record['answer']}\n", file=out)
    runs = ", ".join(f"{t:.3f}" for t in record["baseline_ttft_runs_s"])
    print(f"TTFT full prefill (baseline): {record['baseline_ttft_s']:.3f} s   (runs: {runs})", file=out)
    runs = ", ".join(f"{t:.3f}" for t in record["blended_ttft_runs_s"])
    print(f"TTFT blended:                 {record['blended_ttft_s']:.3f} s   (runs: {runs})", file=out)
    speedup = record["speedup"]
    print(f"Speedup: {speedup:.2f}x" if speedup else "Speedup: n/a", file=out)
    pre = record["precompute"]
    print(f"Precompute: {pre['requests']} requests, {pre['tokens']} tokens, {pre['seconds']:.2f} s", file=out)
    print(f"TTFT source: {record['ttft_source']}", file=out)
    if record.get("note"):
        print(f"Note: {record['note']}", file=out)


def write_output(record: dict[str, Any], path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise UserFacingError(f"Cannot write --output {path}: {exc.strerror}.") from exc
    log.info("wrote %s", path)
