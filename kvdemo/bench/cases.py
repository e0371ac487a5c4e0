"""The measurement protocols: one repeat of a case, its summary over repeats, and the blend trace request.

Blend (per repeat, fresh chunk text, requests one at a time):

    plain: cold (order A, q1) → prefix hit (order A, q2) → reordered (order B, q3; long decode)
    LMCache: cold (A, q1) → precompute chunks → same order (A, q2) → reordered (B, q3; long decode)

Share: LMCache A (stores) → LMCache B (loads what A stored) → plain A → plain B, one fresh document.

A scenario's protocol is a `BenchCases`: BLEND_CASES and SHARE_CASES below, found by scenario name with
`cases_for` (the bench knows the scenarios; a scenario knows nothing of the bench).
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import page_cache
from ..client import EngineClient, RequestStats
from ..config import check_scenario_name
from ..engine_handle import EngineHandle
from ..errors import UserFacingError
from ..prompts import PromptBuilder
from ..runtime import Runtime
from .plots import plot_blend, plot_share

CHUNKS_PER_PROMPT = 8
TTFT_KEYS = ("plain_cold_ttft_s", "plain_prefix_hit_ttft_s", "plain_reordered_ttft_s", "blend_cold_ttft_s",
             "blend_same_order_ttft_s", "blend_reordered_ttft_s")
SHARE_TTFT_KEYS = ("a_cold_ttft_s", "b_after_a_ttft_s", "plain_a_ttft_s", "plain_b_ttft_s")
TRACE_PRINT_KEYS = ("untraced_ttft_s", "cpu_blend_ms", "gpu_span_ms", "kernel_busy_ms", "h2d_copy_busy_ms",
                    "h2d_overlapped_with_kernels_ms", "gpu_idle_ms")
B_LOAD_PATTERNS = ("Retrieved", "kvdemo pipeline:")


def _no_fields(runtime: Runtime) -> dict:
    return {}


def _no_annotations(runtime: Runtime, repeats: list[dict]) -> None:
    return None


@dataclass(frozen=True)
class BenchCases:
    """A scenario's TTFT benchmark protocol; kvdemo.bench runs it for each context size and repeat."""

    repeat: Callable[[Runtime, int, int, str], Awaitable[dict]]  # (runtime, context, decode tokens, tag) → repeat
    summarize: Callable[[int, list[dict]], dict]  # (context target, repeats) → one case of the result
    ttft_keys: tuple[str, ...]  # of a repeat, printed after each one
    requests: str  # how the requests are sent (after "one at a time; " in the result file)
    case_line: Callable[[dict], str]  # one case of the result, for the terminal
    plot: Callable[[dict, Path, Any], None]  # (result, png, matplotlib.pyplot): the result's figure
    extra_fields: Callable[[Runtime], dict] = field(default=_no_fields)  # more result fields, after the evidence
    # adds figures to a context's repeats before they are summarized (e.g. from the engine logs)
    annotate: Callable[[Runtime, list[dict]], None] = field(default=_no_annotations)
    traceable: bool = False  # --trace-contexts can trace the LMCache engine's blend


def synthetic_chunks(builder: PromptBuilder, n: int, tokens_each: int, tag: str) -> list[list[int]]:
    """n chunks of ~tokens_each ids: a unique nonce line, then real corpus text (offset per chunk)."""
    pool = [t for name in builder.library.chunks for t in builder.chunk_ids(name)]
    chunks = []
    for i in range(n):
        nonce = list(builder.tokenizer.encode(f"Revision {tag}-{i}: ", add_special_tokens=False))
        body_len = max(1, tokens_each - len(nonce))
        start = (i * len(pool) // n) % len(pool)
        body = (pool[start:] + pool)[:body_len]
        chunks.append(nonce + body)
    return chunks


async def _ask(client: EngineClient, ids: list[int], max_tokens: int = 1, **kw) -> RequestStats:
    _, stats = await client.complete(ids, max_tokens=max_tokens, temperature=0.0, **kw)
    return stats


def engine_log_lines(engine: EngineHandle) -> list[str]:
    """The engine's log (empty for an attached engine: its log is elsewhere)."""
    proc = engine.process
    if proc is None:
        return []
    return proc.log_path.read_text(errors="replace").splitlines()


# ----- blend ----------------------------------------------------------------------------------------------
async def run_repeat(runtime: Runtime, context_tokens: int, decode_tokens: int, tag: str) -> dict:
    """One repeat of one case: every TTFT of the protocol above, with fresh chunks."""
    builder = runtime.builder
    assert builder is not None
    sys_ids = builder.sys_ids()
    questions = [builder.question_ids(f"Question {tag}-{k}: which section explains how names are bound, "
                                      f"and what does it say?") for k in range(3)]
    per_chunk = (context_tokens - len(sys_ids) - len(questions[0])) // CHUNKS_PER_PROMPT - len(builder.sep_ids)
    chunks = synthetic_chunks(builder, CHUNKS_PER_PROMPT, per_chunk, tag)
    order_b = chunks[::-1]
    prompt_a1, prompt_a2 = (builder.assemble(sys_ids, chunks, q) for q in questions[:2])
    prompt_b3 = builder.assemble(sys_ids, order_b, questions[2])
    plain = next(h for h in runtime.engines if not h.spec.lmcache).client()
    blend = runtime.lmcache_engine.client()
    try:
        r: dict = {"context_tokens": len(prompt_a1)}
        r["plain_cold_ttft_s"] = (await _ask(plain, prompt_a1)).ttft_s
        r["plain_prefix_hit_ttft_s"] = (await _ask(plain, prompt_a2)).ttft_s
        s = await _ask(plain, prompt_b3, decode_tokens, ignore_eos=True)
        r["plain_reordered_ttft_s"], r["plain_decode_tok_s"] = s.ttft_s, s.decode_tok_s
        r["blend_cold_ttft_s"] = (await _ask(blend, prompt_a1, skip_save=True)).ttft_s
        t0 = time.perf_counter()
        for ids in builder.precompute_layout(sys_ids, chunks):
            await _ask(blend, ids)
        r["precompute_s"] = time.perf_counter() - t0
        r["blend_same_order_ttft_s"] = (await _ask(blend, prompt_a2, skip_save=True)).ttft_s
        s = await _ask(blend, prompt_b3, decode_tokens, ignore_eos=True, skip_save=True)
        r["blend_reordered_ttft_s"], r["blend_decode_tok_s"] = s.ttft_s, s.decode_tok_s
        return r
    finally:
        await plain.close()
        await blend.close()


async def run_trace(runtime: Runtime, context_tokens: int, tag: str, trace_dir: Path,
                    timeout_s: float = 120.0) -> dict:
    """One extra blended, reordered request with the torch profiler on in the LMCache engine.

    Fresh chunks are precomputed and one untraced reordered question warms the path; then the arm file
    makes the plugin (KVDEMO_TRACE_DIR) trace the next blend. The traced request's TTFT includes the
    profiler's cost: it is reported apart and never as a result."""
    builder = runtime.builder
    assert builder is not None
    sys_ids = builder.sys_ids()
    q_warm, q_traced = (builder.question_ids(f"Question {tag}-{k}: which section explains name binding?")
                        for k in range(2))
    per_chunk = (context_tokens - len(sys_ids) - len(q_warm)) // CHUNKS_PER_PROMPT - len(builder.sep_ids)
    chunks = synthetic_chunks(builder, CHUNKS_PER_PROMPT, per_chunk, tag)
    blend = runtime.lmcache_engine.client()
    label = f"trace-{context_tokens}"
    summary_path = trace_dir / f"{label}-summary.json"
    try:
        for ids in builder.precompute_layout(sys_ids, chunks):
            await _ask(blend, ids)
        untraced = await _ask(blend, builder.assemble(sys_ids, chunks[::-1], q_warm), skip_save=True)
        summary_path.unlink(missing_ok=True)
        (trace_dir / "arm").write_text(label)
        traced = await _ask(blend, builder.assemble(sys_ids, chunks[1:] + chunks[:1], q_traced), skip_save=True)
    finally:
        await blend.close()
    deadline = time.monotonic() + timeout_s
    while not summary_path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    if not summary_path.exists():
        raise UserFacingError(f"no blend trace appeared in {trace_dir} (is the LMCache engine blending?)")
    return {"context_target": context_tokens, "untraced_ttft_s": untraced.ttft_s,
            "traced_ttft_s_includes_profiler": traced.ttft_s, **json.loads(summary_path.read_text())}


def summarize(context_target: int, repeats: list[dict]) -> dict:
    """Medians over repeats, plus the raw repeats and the ratios the issue's targets are stated in."""
    med = {k: statistics.median(r[k] for r in repeats) for k in (*TTFT_KEYS, "precompute_s")}
    dec = {k: statistics.median(r[k] for r in repeats if r[k]) if any(r[k] for r in repeats) else None
           for k in ("plain_decode_tok_s", "blend_decode_tok_s")}
    case = {"context_tokens": repeats[0]["context_tokens"], "context_target": context_target,
            "n_chunks": CHUNKS_PER_PROMPT, **med, **dec, "repeats": repeats}
    case["speedup_reordered"] = med["plain_reordered_ttft_s"] / med["blend_reordered_ttft_s"]
    case["blend_reordered_over_plain_prefix_hit"] = med["blend_reordered_ttft_s"] / med["plain_prefix_hit_ttft_s"]
    if dec["plain_decode_tok_s"] and dec["blend_decode_tok_s"]:
        case["decode_ratio_lmcache_over_plain"] = dec["blend_decode_tok_s"] / dec["plain_decode_tok_s"]
    return case


def blend_case_line(c: dict) -> str:
    return (f"  {c['context_tokens']:>6} tokens: plain reordered {c['plain_reordered_ttft_s']:.3f} s, "
            f"blend reordered {c['blend_reordered_ttft_s']:.3f} s → {c['speedup_reordered']:.2f}×; "
            f"prefix hit {c['plain_prefix_hit_ttft_s']:.3f} s")


# ----- share ----------------------------------------------------------------------------------------------
async def run_share_repeat(runtime: Runtime, context_tokens: int, decode_tokens: int, tag: str) -> dict:
    """One repeat of the share scenario: LMCache A stores a fresh document → LMCache B loads what A stored
    (next question; the store's files still in the page cache) → plain A → plain B; A and plain A also
    decode `decode_tokens` tokens. On a directory store, then a second fresh document: A stores it, its
    files are dropped from the page cache (kvdemo.page_cache), and B loads it from the disk (cold store)."""
    first, second = share_prompts(runtime.builder, context_tokens, tag)
    clients = {h.spec.key: h.client() for h in runtime.engines}
    store = runtime.kv_store
    try:
        before = store.size_bytes()
        a = await _ask(clients["lmcache_a"], first, decode_tokens, ignore_eos=True)
        store_bytes = store.size_bytes() - before
        b = await _ask(clients["lmcache_b"], second)
        cold: dict[str, Any] = {"b_after_a_cold_store_ttft_s": None}
        if store.directory is not None:
            cold_first, cold_second = share_prompts(runtime.builder, context_tokens, f"{tag}-cold")
            await _ask(clients["lmcache_a"], cold_first)
            await asyncio.to_thread(page_cache.wait_until_settled, store.directory)
            dropped = await asyncio.to_thread(page_cache.drop_directory, store.directory)
            b_cold = await _ask(clients["lmcache_b"], cold_second)
            cold = {"b_after_a_cold_store_ttft_s": b_cold.ttft_s, "cold_store_drop": dropped.as_dict(),
                    "b_cold_request_id": b_cold.request_id}
        plain_a = await _ask(clients["plain_a"], first, decode_tokens, ignore_eos=True)
        plain_b = await _ask(clients["plain_b"], second)
    finally:
        for c in clients.values():
            await c.close()
    return {"context_tokens": len(first), "a_cold_ttft_s": a.ttft_s, "b_after_a_ttft_s": b.ttft_s, **cold,
            "plain_a_ttft_s": plain_a.ttft_s, "plain_b_ttft_s": plain_b.ttft_s, "b_cached_tokens": b.cached_tokens,
            "lmcache_decode_tok_s": a.decode_tok_s, "plain_decode_tok_s": plain_a.decode_tok_s,
            "store_bytes": store_bytes, "b_request_id": b.request_id}


def share_prompts(builder: PromptBuilder | None, context_tokens: int, tag: str) -> tuple[list[int], list[int]]:
    """Two questions over one fresh document of ``context_tokens`` (A asks the first, B the second)."""
    assert builder is not None
    sys_ids = builder.sys_ids()
    q1, q2 = (builder.question_ids(f"Question {tag}-{k}: which section explains name binding?") for k in range(2))
    per_chunk = (context_tokens - len(sys_ids) - len(q1)) // CHUNKS_PER_PROMPT - len(builder.sep_ids)
    chunks = synthetic_chunks(builder, CHUNKS_PER_PROMPT, per_chunk, tag)
    return builder.assemble(sys_ids, chunks, q1), builder.assemble(sys_ids, chunks, q2)


def summarize_share(context_target: int, repeats: list[dict]) -> dict:
    keys = (*SHARE_TTFT_KEYS, "b_after_a_cold_store_ttft_s", "lmcache_decode_tok_s", "plain_decode_tok_s",
            "store_bytes", "b_load_gb_s", "b_read_gb_s", "b_cold_load_gb_s", "b_cold_read_gb_s")
    med = {k: _median_or_none([r.get(k) for r in repeats]) for k in keys}
    case = {"context_tokens": repeats[0]["context_tokens"], "context_target": context_target, **med,
            "repeats": repeats}
    case["b_after_a_over_a_cold"] = med["b_after_a_ttft_s"] / med["a_cold_ttft_s"]
    case["b_after_a_over_plain_a"] = med["b_after_a_ttft_s"] / med["plain_a_ttft_s"]
    case["a_cold_over_plain_a"] = med["a_cold_ttft_s"] / med["plain_a_ttft_s"]
    cold_b = med["b_after_a_cold_store_ttft_s"]
    case["b_cold_store_over_plain_a"] = cold_b / med["plain_a_ttft_s"] if cold_b is not None else None
    case["decode_ratio_lmcache_over_plain"] = med["lmcache_decode_tok_s"] / med["plain_decode_tok_s"]
    return case


def _median_or_none(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def share_case_line(c: dict) -> str:
    cold = c.get("b_after_a_cold_store_ttft_s")
    load = c.get("b_load_gb_s")
    return (f"  {c['context_tokens']:>6} tokens: A cold {c['a_cold_ttft_s']:.3f} s, B after A "
            f"{c['b_after_a_ttft_s']:.3f} s ({c['b_after_a_over_a_cold']:.2f}× A cold, "
            f"{c['b_after_a_over_plain_a']:.2f}× plain A){f', load {load:.1f} GB/s' if load else ''}"
            f"{f'; cold store {cold:.3f} s' if cold is not None else ''}; plain A {c['plain_a_ttft_s']:.3f} s, "
            f"plain B {c['plain_b_ttft_s']:.3f} s")


def add_b_load_figures(runtime: Runtime, repeats: list[dict]) -> None:
    """Per repeat, B's load rates from its engine log's "kvdemo pipeline" line for that request, warm and cold:
    the copy to the GPU (``*load_gb_s``: bytes / copy time, issue #17's 40 GB/s target) and the whole load
    (``*read_gb_s``: bytes / (read + copy) time, what the store itself allows: page cache, disk or Redis)."""
    lines = b_load_log(runtime, limit=10_000)
    for r in repeats:
        warm = pipeline_figures(lines, r.get("b_request_id"))
        cold = pipeline_figures(lines, r.get("b_cold_request_id"))
        r["b_load_gb_s"] = warm["copy_gb_s"] if warm else None
        r["b_read_gb_s"] = warm["total_gb_s"] if warm else None
        r["b_cold_load_gb_s"] = cold["copy_gb_s"] if cold else None
        r["b_cold_read_gb_s"] = cold["total_gb_s"] if cold else None
        r["b_load_pipeline"], r["b_cold_load_pipeline"] = warm, cold


PIPELINE_LINE = re.compile(r"kvdemo pipeline: \[req_id=(?P<req>[^\]]+)\] retrieved (?P<tokens>\d+) of \d+ required "
                           r"tokens \((?P<gb>[\d.]+) GB\) in (?P<total_ms>[\d.]+) ms .*?waited (?P<wait_ms>[\d.]+) ms "
                           r"for reads, (?P<copy_ms>[\d.]+) ms copying")


def pipeline_figures(lines: list[str], request_id: str | None) -> dict | None:
    """The pipeline line of the request vLLM named ``cmpl-<request_id>-...``; None if there is none."""
    if not request_id:
        return None
    for line in lines:
        m = PIPELINE_LINE.search(line)
        if m and f"cmpl-{request_id}-" in m["req"]:
            gb, total, copy = float(m["gb"]), float(m["total_ms"]), float(m["copy_ms"])
            return {"tokens": int(m["tokens"]), "gb": gb, "total_ms": total, "wait_ms": float(m["wait_ms"]),
                    "copy_ms": copy, "copy_gb_s": round(gb / copy * 1e3, 2) if copy > 0 else None,
                    "total_gb_s": round(gb / total * 1e3, 2) if total > 0 else None}
    return None


def b_load_log(runtime: Runtime, limit: int = 40) -> list[str]:
    """Share scenario: engine B's per-request load lines (LMCache's "Retrieved ..." or the plugin's
    "kvdemo pipeline: ..."), which split B's TTFT into loading the shared store and the rest."""
    engine = next((h for h in runtime.engines if h.spec.key == "lmcache_b"), None)
    lines = engine_log_lines(engine) if engine is not None else []
    return [ln.strip()[:600] for ln in lines if any(p in ln for p in B_LOAD_PATTERNS)][-limit:]


BLEND_CASES = BenchCases(repeat=run_repeat, summarize=summarize, ttft_keys=TTFT_KEYS,
                         requests="blended questions sent with lmcache.skip_save", case_line=blend_case_line,
                         plot=plot_blend, traceable=True)
SHARE_CASES = BenchCases(repeat=run_share_repeat, summarize=summarize_share, ttft_keys=SHARE_TTFT_KEYS,
                         requests="LMCache engines store every request (A stores, B loads)",
                         case_line=share_case_line, plot=plot_share,
                         extra_fields=lambda runtime: {"b_load_log": b_load_log(runtime)},
                         annotate=add_b_load_figures)
CASES = {"blend": BLEND_CASES, "share": SHARE_CASES}  # scenario name → the protocol it is measured by


def cases_for(scenario: str) -> BenchCases:
    """The protocol ``python -m kvdemo.bench --scenario NAME`` measures; an unknown name is a UserFacingError."""
    check_scenario_name(scenario)
    return CASES[scenario]
