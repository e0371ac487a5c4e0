"""The share scenario's protocol: LMCache A stores a fresh document → LMCache B loads what A stored → plain A →
plain B; on a directory store also B from a cold store (A's files dropped from the page cache first). B's load
rates come from its engine log's "kvdemo pipeline" line for each request."""

from __future__ import annotations

import asyncio
import re
import statistics
from typing import Any

from .. import page_cache
from ..prompts import PromptBuilder
from ..runtime import Runtime
from .plots import plot_share
from .protocol import CHUNKS_PER_PROMPT, BenchCases, ask, engine_log_lines, synthetic_chunks

SHARE_TTFT_KEYS = ("a_cold_ttft_s", "b_after_a_ttft_s", "plain_a_ttft_s", "plain_b_ttft_s")
B_LOAD_PATTERNS = ("Retrieved", "kvdemo pipeline:")
A_STORE_PATTERNS = ("] Stored ", "kvdemo async_save: [")  # LMCache's own store, the plugin's async_save


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
        a = await ask(clients["lmcache_a"], first, decode_tokens, ignore_eos=True)
        store_bytes = store.size_bytes() - before
        b = await ask(clients["lmcache_b"], second)
        cold: dict[str, Any] = {"b_after_a_cold_store_ttft_s": None}
        if store.directory is not None:
            cold_first, cold_second = share_prompts(runtime.builder, context_tokens, f"{tag}-cold")
            await ask(clients["lmcache_a"], cold_first)
            await asyncio.to_thread(page_cache.wait_until_settled, store.size_bytes)
            dropped = await asyncio.to_thread(page_cache.drop_directory, store.directory)
            b_cold = await ask(clients["lmcache_b"], cold_second)
            cold = {"b_after_a_cold_store_ttft_s": b_cold.ttft_s, "cold_store_drop": dropped.as_dict(),
                    "b_cold_request_id": b_cold.request_id}
        plain_a = await ask(clients["plain_a"], first, decode_tokens, ignore_eos=True)
        plain_b = await ask(clients["plain_b"], second)
    finally:
        for c in clients.values():
            await c.close()
    return {"context_tokens": len(first), "a_cold_ttft_s": a.ttft_s, "b_after_a_ttft_s": b.ttft_s, **cold,
            "plain_a_ttft_s": plain_a.ttft_s, "plain_b_ttft_s": plain_b.ttft_s, "b_cached_tokens": b.cached_tokens,
            "lmcache_decode_tok_s": a.decode_tok_s, "plain_decode_tok_s": plain_a.decode_tok_s,
            "store_bytes": store_bytes, "a_request_id": a.request_id, "b_request_id": b.request_id}


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
            "store_bytes", "b_load_gb_s", "b_read_gb_s", "b_cold_load_gb_s", "b_cold_read_gb_s", "a_store_step_ms")
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
    the copy to the GPU (``*load_gb_s``: bytes / copy time) and the whole load
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


def add_a_store_figures(runtime: Runtime, repeats: list[dict]) -> None:
    """Per repeat, what storing A's request cost the engine steps that computed it (``a_store_step_ms``: the
    sum over its steps of LMCache's store, or of the allocate + enqueue that async_save leaves in the step) and
    the copies off the GPU (``a_store``), from A's engine log."""
    lines = a_store_log(runtime, limit=10_000)
    for r in repeats:
        figures = store_figures(lines, r.get("a_request_id"))
        r["a_store"], r["a_store_step_ms"] = figures, figures["step_ms"] if figures else None


def annotate_share(runtime: Runtime, repeats: list[dict]) -> None:
    add_b_load_figures(runtime, repeats)
    add_a_store_figures(runtime, repeats)


GIB = 1024 ** 3
SYNC_STORE_LINE = re.compile(r"\[req_id=(?P<req>[^\]]+)\] Stored (?P<tokens>\d+) out of total \d+ tokens\. size: "
                             r"(?P<gib>[\d.]+) GB, cost (?P<step_ms>[\d.]+) ms.*?offload_time: (?P<copy_ms>[\d.]+) ms")
ASYNC_STORE_LINE = re.compile(r"kvdemo async_save: \[req_id=(?P<req>[^\]]+)\] stored (?P<tokens>\d+) of \d+ tokens "
                              r"\((?P<gb>[\d.]+) GB\): the step paid (?P<step_ms>[\d.]+) ms, the copy took "
                              r"(?:(?P<copy_ms>[\d.]+)|\?) ms")


def store_figures(lines: list[str], request_id: str | None) -> dict | None:
    """The stores of the request vLLM named ``cmpl-<request_id>-...`` (one line per step that stored it), summed:
    ``mode`` sync (LMCache's store: ``step_ms`` is its cost, ``copy_ms`` its offload time) or async (the plugin's
    async_save: ``step_ms`` is what the step paid, ``copy_ms`` the copies' GPU time); None if there is none."""
    if not request_id:
        return None
    found = []
    for line in lines:
        m = SYNC_STORE_LINE.search(line) or ASYNC_STORE_LINE.search(line)
        if m and f"cmpl-{request_id}-" in m["req"]:
            gb = float(m["gb"]) if m.re is ASYNC_STORE_LINE else float(m["gib"]) * GIB / 1e9
            copy = m["copy_ms"]
            found.append(("async" if m.re is ASYNC_STORE_LINE else "sync", int(m["tokens"]), gb,
                          float(m["step_ms"]), float(copy) if copy is not None else None))
    if not found:
        return None
    gb = sum(f[2] for f in found)
    copies = [f[4] for f in found]
    copy_ms = sum(copies) if None not in copies else None
    return {"mode": "/".join(sorted({f[0] for f in found})), "steps": len(found),
            "tokens": sum(f[1] for f in found), "gb": round(gb, 4), "step_ms": round(sum(f[3] for f in found), 2),
            "copy_ms": round(copy_ms, 2) if copy_ms is not None else None,
            "copy_gb_s": round(gb / copy_ms * 1e3, 2) if copy_ms else None}


def a_store_log(runtime: Runtime, limit: int = 40) -> list[str]:
    """Share scenario: engine A's store lines (LMCache's "Stored ..." or the plugin's "kvdemo async_save: ..."),
    what storing the document cost A's first request."""
    engine = next((h for h in runtime.engines if h.spec.key == "lmcache_a"), None)
    lines = engine_log_lines(engine) if engine is not None else []
    return [ln.strip()[:600] for ln in lines if any(p in ln for p in A_STORE_PATTERNS)][-limit:]


def b_load_log(runtime: Runtime, limit: int = 40) -> list[str]:
    """Share scenario: engine B's per-request load lines (LMCache's "Retrieved ..." or the plugin's
    "kvdemo pipeline: ..."), which split B's TTFT into loading the shared store and the rest."""
    engine = next((h for h in runtime.engines if h.spec.key == "lmcache_b"), None)
    lines = engine_log_lines(engine) if engine is not None else []
    return [ln.strip()[:600] for ln in lines if any(p in ln for p in B_LOAD_PATTERNS)][-limit:]


SHARE_CASES = BenchCases(repeat=run_share_repeat, summarize=summarize_share, ttft_keys=SHARE_TTFT_KEYS,
                         requests="LMCache engines store every request (A stores, B loads)",
                         case_line=share_case_line, plot=plot_share,
                         extra_fields=lambda runtime: {"b_load_log": b_load_log(runtime),
                                                       "a_store_log": a_store_log(runtime)},
                         annotate=annotate_share)
