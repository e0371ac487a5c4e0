"""The blend scenario's protocol (one repeat of a case, its summary over repeats, the blend trace request) and
the registry of every scenario's protocol.

Blend (per repeat, fresh chunk text, requests one at a time):

    plain: cold (order A, q1) → prefix hit (order A, q2) → reordered (order B, q3; long decode)
    LMCache: cold (A, q1) → precompute chunks → same order (A, q2) → reordered (B, q3; long decode)

Share: LMCache A (stores) → LMCache B (loads what A stored) → plain A → plain B, one fresh document
(share_cases.py).

A scenario's protocol is a `BenchCases`: BLEND_CASES and SHARE_CASES below, found by scenario name with
`cases_for` (the bench knows the scenarios; a scenario knows nothing of the bench).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

from ..config import check_scenario_name
from ..errors import UserFacingError
from ..runtime import Runtime
from .plots import plot_blend
from .protocol import CHUNKS_PER_PROMPT, BenchCases, ask, synthetic_chunks
from .share_cases import SHARE_CASES

TTFT_KEYS = ("plain_cold_ttft_s", "plain_prefix_hit_ttft_s", "plain_reordered_ttft_s", "blend_cold_ttft_s",
             "blend_same_order_ttft_s", "blend_reordered_ttft_s")
TRACE_PRINT_KEYS = ("untraced_ttft_s", "cpu_blend_ms", "gpu_span_ms", "kernel_busy_ms", "h2d_copy_busy_ms",
                    "h2d_overlapped_with_kernels_ms", "gpu_idle_ms")


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
        r["plain_cold_ttft_s"] = (await ask(plain, prompt_a1)).ttft_s
        r["plain_prefix_hit_ttft_s"] = (await ask(plain, prompt_a2)).ttft_s
        s = await ask(plain, prompt_b3, decode_tokens, ignore_eos=True)
        r["plain_reordered_ttft_s"], r["plain_decode_tok_s"] = s.ttft_s, s.decode_tok_s
        r["blend_cold_ttft_s"] = (await ask(blend, prompt_a1, skip_save=True)).ttft_s
        t0 = time.perf_counter()
        for ids in builder.precompute_layout(sys_ids, chunks):
            await ask(blend, ids)
        r["precompute_s"] = time.perf_counter() - t0
        r["blend_same_order_ttft_s"] = (await ask(blend, prompt_a2, skip_save=True)).ttft_s
        s = await ask(blend, prompt_b3, decode_tokens, ignore_eos=True, skip_save=True)
        r["blend_reordered_ttft_s"], r["blend_decode_tok_s"] = s.ttft_s, s.decode_tok_s
        return r
    finally:
        await plain.close()
        await blend.close()


async def run_trace(runtime: Runtime, context_tokens: int, tag: str, trace_dir: Path,
                    timeout_s: float = 120.0, label: str | None = None) -> dict:
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
    label = label or f"trace-{context_tokens}"
    summary_path = trace_dir / f"{label}-summary.json"
    try:
        for ids in builder.precompute_layout(sys_ids, chunks):
            await ask(blend, ids)
        untraced = await ask(blend, builder.assemble(sys_ids, chunks[::-1], q_warm), skip_save=True)
        summary_path.unlink(missing_ok=True)
        (trace_dir / "arm").write_text(label)
        traced = await ask(blend, builder.assemble(sys_ids, chunks[1:] + chunks[:1], q_traced), skip_save=True)
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


BLEND_CASES = BenchCases(repeat=run_repeat, summarize=summarize, ttft_keys=TTFT_KEYS,
                         requests="blended questions sent with lmcache.skip_save", case_line=blend_case_line,
                         plot=plot_blend, traceable=True)
CASES = {"blend": BLEND_CASES, "share": SHARE_CASES}  # scenario name → the protocol it is measured by


def cases_for(scenario: str) -> BenchCases:
    """The protocol ``python -m kvdemo.bench --scenario NAME`` measures; an unknown name is a UserFacingError."""
    check_scenario_name(scenario)
    return CASES[scenario]
