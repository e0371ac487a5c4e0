"""TTFT benchmark of blending vs plain vLLM, against the engines the app starts (same Runtime code path).

    python -m kvdemo.bench --model DIR --engine-args "--load-format dummy" [--contexts 4000,8000,16000,24000]

For each context size and repeat, fresh chunk text (a unique nonce at the start of every chunk) makes sure
nothing is cached by accident. Per repeat, requests go one at a time:

    plain: cold (order A, q1) → prefix hit (order A, q2) → reordered (order B, q3; long decode)
    LMCache: cold (A, q1) → precompute chunks → same order (A, q2) → reordered (B, q3; long decode)

Blended questions are sent with `lmcache.skip_save` (they are not chunks worth keeping), exactly as the UI
does. Writes benchmarks/results/blend-<gpu>.json and a PNG plot (plot needs matplotlib; `--plot-only
FILE.json` redraws it on another machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path

from .client import EngineClient, RequestStats
from .config import REPO_ROOT, build_parser, settings_from_args
from .errors import UserFacingError
from .main import _raise_exit, headless
from .preflight import detect_gpus
from .prompts import PromptBuilder
from .quality_bench import add_quality_flags, quoted_argv, run_quality
from .runtime import Runtime

log = logging.getLogger(__name__)
CHUNKS_PER_PROMPT = 8
TTFT_KEYS = ("plain_cold_ttft_s", "plain_prefix_hit_ttft_s", "plain_reordered_ttft_s", "blend_cold_ttft_s",
             "blend_same_order_ttft_s", "blend_reordered_ttft_s")
EVIDENCE_PATTERNS = ("Registering vllm model", "Creating blender", "kvdemo plugin: applied", "LMCache hit tokens",
                     "Number of indices picked", "Retrieved", "kvdemo-profile")
B_LOAD_PATTERNS = ("Retrieved", "kvdemo pipeline:")


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


TRACE_PRINT_KEYS = ("untraced_ttft_s", "cpu_blend_ms", "gpu_span_ms", "kernel_busy_ms", "h2d_copy_busy_ms",
                    "h2d_overlapped_with_kernels_ms", "gpu_idle_ms")
SHARE_TTFT_KEYS = ("a_cold_ttft_s", "b_after_a_ttft_s", "plain_a_ttft_s", "plain_b_ttft_s")


async def run_share_repeat(runtime: Runtime, context_tokens: int, decode_tokens: int, tag: str) -> dict:
    """One repeat of the share scenario with a fresh document: LMCache A (stores) → LMCache B (loads what A
    stored, next question) → plain A → plain B. A and plain A also decode `decode_tokens` tokens."""
    builder = runtime.builder
    assert builder is not None
    sys_ids = builder.sys_ids()
    q1, q2 = (builder.question_ids(f"Question {tag}-{k}: which section explains name binding?") for k in range(2))
    per_chunk = (context_tokens - len(sys_ids) - len(q1)) // CHUNKS_PER_PROMPT - len(builder.sep_ids)
    chunks = synthetic_chunks(builder, CHUNKS_PER_PROMPT, per_chunk, tag)
    first, second = builder.assemble(sys_ids, chunks, q1), builder.assemble(sys_ids, chunks, q2)
    clients = {h.spec.key: h.client() for h in runtime.engines}
    try:
        before = runtime.kv_store.size_bytes()
        a = await _ask(clients["lmcache_a"], first, decode_tokens, ignore_eos=True)
        store_bytes = runtime.kv_store.size_bytes() - before
        b = await _ask(clients["lmcache_b"], second)
        plain_a = await _ask(clients["plain_a"], first, decode_tokens, ignore_eos=True)
        plain_b = await _ask(clients["plain_b"], second)
    finally:
        for c in clients.values():
            await c.close()
    return {"context_tokens": len(first), "a_cold_ttft_s": a.ttft_s, "b_after_a_ttft_s": b.ttft_s,
            "plain_a_ttft_s": plain_a.ttft_s, "plain_b_ttft_s": plain_b.ttft_s, "b_cached_tokens": b.cached_tokens,
            "lmcache_decode_tok_s": a.decode_tok_s, "plain_decode_tok_s": plain_a.decode_tok_s,
            "store_bytes": store_bytes}


def summarize_share(context_target: int, repeats: list[dict]) -> dict:
    keys = (*SHARE_TTFT_KEYS, "lmcache_decode_tok_s", "plain_decode_tok_s", "store_bytes")
    med = {k: statistics.median(r[k] for r in repeats if r[k] is not None) for k in keys}
    case = {"context_tokens": repeats[0]["context_tokens"], "context_target": context_target, **med,
            "repeats": repeats}
    case["b_after_a_over_a_cold"] = med["b_after_a_ttft_s"] / med["a_cold_ttft_s"]
    case["decode_ratio_lmcache_over_plain"] = med["lmcache_decode_tok_s"] / med["plain_decode_tok_s"]
    return case


def versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("vllm", "lmcache", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def evidence(runtime: Runtime, limit_per_pattern: int = 3) -> list[str]:
    """A few LMCache log lines from the 🚀 engine that show registration, blending and retrieval."""
    lines = _engine_log_lines(runtime.lmcache_engine)
    found = []
    for pattern in EVIDENCE_PATTERNS:
        hits = [ln.strip()[:300] for ln in lines if pattern in ln]
        found += hits[:limit_per_pattern] + (hits[-1:] if len(hits) > limit_per_pattern else [])
    return found


def b_load_log(runtime: Runtime, limit: int = 40) -> list[str]:
    """Share scenario: engine B's per-request load lines (LMCache's "Retrieved ..." or the plugin's
    "kvdemo pipeline: ..."), which split B's TTFT into loading the shared store and the rest."""
    engine = next((h for h in runtime.engines if h.spec.key == "lmcache_b"), None)
    lines = _engine_log_lines(engine) if engine is not None else []
    return [ln.strip()[:400] for ln in lines if any(p in ln for p in B_LOAD_PATTERNS)][-limit:]


def _engine_log_lines(engine) -> list[str]:
    proc = engine.process
    if proc is None:
        return []
    return proc.log_path.read_text(errors="replace").splitlines()


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


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if result.get("scenario") == "share":
        plot_share(result, png, plt)
        return
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


def token_counts(flag: str, text: str) -> list[int]:
    """``4000,8000`` → [4000, 8000]; anything else is a one-line error naming the flag."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserFacingError(f"{flag} takes token counts separated by commas, e.g. 8000,16000 (got {text!r}).")
    return values


def build_bench_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "python -m kvdemo.bench"
    g = p.add_argument_group("benchmark")
    g.add_argument("--contexts", default="4000,8000,16000,24000", help="context sizes in tokens")
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--decode-tokens", type=int, default=256, help="output tokens of the decode-speed requests")
    g.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    g.add_argument("--name", help="result file stem: <name>-<gpu>.json (default: the scenario)")
    g.add_argument("--plot-only", type=Path, help="redraw the PNG of an existing result JSON and exit")
    g.add_argument("--skip-app-question", action="store_true",
                   help="do not run the app's headless question before the cases")
    g.add_argument("--trace-contexts", default="",
                   help="after the cases, trace one extra blended request per context size with the torch "
                        "profiler inside the LMCache engine (real engines only); writes <name>-<gpu>-trace-"
                        "<ctx>.json.gz next to the result and a summary into it")
    add_quality_flags(p)
    return p


def run(argv: list[str] | None = None) -> dict:
    a = build_bench_parser().parse_args(argv)
    if a.plot_only:
        result = json.loads(a.plot_only.read_text())
        plot(result, a.plot_only.with_suffix(".png"))
        print(f"kvdemo.bench: wrote {a.plot_only.with_suffix('.png')}")
        return result
    a.no_ui, a.ask = True, a.ask or "Which section explains name binding?"
    settings = settings_from_args(a)
    if a.quality:
        a.name = a.name or "quality"
        return run_quality(a, settings, quoted_argv(argv))
    out = Path(a.out)
    if settings.simulate and out.resolve() == (REPO_ROOT / "benchmarks" / "results").resolve():
        raise UserFacingError("benchmarks/results holds GPU measurements only: give --out for a SIMULATED run.")
    contexts = token_counts("--contexts", a.contexts)
    if max(contexts) + a.decode_tokens > settings.max_model_len:
        raise UserFacingError(f"--contexts up to {max(contexts)} + {a.decode_tokens} decode tokens exceed "
                              f"--max-model-len {settings.max_model_len}.")
    trace_contexts = token_counts("--trace-contexts", a.trace_contexts) if a.trace_contexts.strip() else []
    if trace_contexts and (settings.simulate or settings.scenario != "blend"):
        raise UserFacingError("--trace-contexts traces the real LMCache engine's blend: blend scenario, no --simulate.")
    trace_dir = Path(tempfile.mkdtemp(prefix="kvdemo-trace-")) if trace_contexts else None
    if trace_dir is not None:
        os.environ["KVDEMO_TRACE_DIR"] = str(trace_dir)  # read by kvdemo.vllm_plugin in the engine
    runtime = Runtime(settings)
    try:
        runtime.start()
        if not a.skip_app_question:
            headless(runtime, settings.ask)  # the app's own path: precompute library + answer
        else:
            runtime.run_precompute()
        gpus = detect_gpus() if not settings.simulate else []
        device = "SIMULATED (no GPU)" if settings.simulate else (gpus[0].name if gpus else "unknown")

        share_scenario = settings.scenario == "share"
        repeat_fn, summarize_fn = (run_share_repeat, summarize_share) if share_scenario else (run_repeat, summarize)
        keys = SHARE_TTFT_KEYS if share_scenario else TTFT_KEYS

        traces: list[dict] = []  # filled by all_cases when --trace-contexts is given

        async def all_cases() -> list[dict]:
            await repeat_fn(runtime, max(contexts), a.decode_tokens, "warmup-" + uuid.uuid4().hex[:6])
            cases = []
            for ctx in contexts:
                repeats = []
                for i in range(a.repeats):
                    rep = await repeat_fn(runtime, ctx, a.decode_tokens, f"{ctx}-{i}-{uuid.uuid4().hex[:6]}")
                    print(f"kvdemo.bench: {ctx} tokens, repeat {i}: " + ", ".join(
                        f"{k}={rep[k]:.3f}" for k in keys), flush=True)
                    repeats.append(rep)
                cases.append(summarize_fn(ctx, repeats))
            for ctx in trace_contexts:
                assert trace_dir is not None
                traces.append(await run_trace(runtime, ctx, f"trace-{ctx}-{uuid.uuid4().hex[:6]}", trace_dir))
                print(f"kvdemo.bench: traced a {ctx}-token blend: " + ", ".join(
                    f"{k}={traces[-1][k]}" for k in TRACE_PRINT_KEYS), flush=True)
            return cases

        cases = asyncio.run(all_cases())
        engine_args = " ".join(settings.engine_args)
        result = {
            "scenario": settings.scenario,
            "device": device,
            **({"simulated": True} if settings.simulate else {}),  # GPU results stay free of the word
            "versions": versions(),
            "model": settings.model,
            "model_shape": "Mistral-7B-Instruct-v0.2" if "mistral" in settings.model.lower() else settings.model,
            "weights": "simulated" if settings.simulate else ("dummy" if "dummy" in engine_args else "real"),
            "command": "python -m kvdemo.bench " + shlex.join(sys.argv[1:] if argv is None else argv),
            "gpu_layout": [{"engine": h.spec.key, "gpu": h.spec.slot.gpu, "shared": h.spec.slot.shared}
                           for h in runtime.engines],
            "lmcache_config": runtime.settings.lmcache_config_path.read_text(),
            "startup_s": {h.spec.key: h.startup_s for h in runtime.engines},
            "precompute_library_s": runtime.progress.seconds - runtime.progress.warm_up_s,
            "precompute_library_requests": runtime.progress.total - runtime.progress.warm_ups,
            "warm_up_s": runtime.progress.warm_up_s,  # one request per engine after precompute (runtime.py)
            # KVDEMO_PROFILE=1 adds CUDA syncs around each phase: such a run's timings are a profile, not results
            "kvdemo_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("KVDEMO_")},
            "decode_tokens": a.decode_tokens,
            "requests": "one at a time; " + ("LMCache engines store every request (A stores, B loads)"
                                             if share_scenario else "blended questions sent with lmcache.skip_save"),
            "kv_store": runtime.kv_store.remote_url if share_scenario else None,
            "cases": cases,
            **({"traces": traces} if traces else {}),
            "evidence": evidence(runtime),
            **({"b_load_log": b_load_log(runtime)} if share_scenario else {}),
        }
    finally:
        runtime.stop()
    out.mkdir(parents=True, exist_ok=True)
    name = a.name or settings.scenario
    stem = f"{name}-{gpu_slug(device) if not settings.simulate else 'simulated'}"
    path = out / f"{stem}.json"
    for t in result.get("traces", []):  # the raw trace travels with the result
        kept = out / f"{stem}-{t['trace']}"
        shutil.copyfile(trace_dir / t["trace"], kept)
        t["trace"] = kept.name
    if trace_dir is not None:
        shutil.rmtree(trace_dir, ignore_errors=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"kvdemo.bench: wrote {path}")
    for c in cases:
        if share_scenario:
            print(f"  {c['context_tokens']:>6} tokens: A cold {c['a_cold_ttft_s']:.3f} s, B after A "
                  f"{c['b_after_a_ttft_s']:.3f} s ({c['b_after_a_over_a_cold']:.2f}× cold); plain A "
                  f"{c['plain_a_ttft_s']:.3f} s, plain B {c['plain_b_ttft_s']:.3f} s")
        else:
            print(f"  {c['context_tokens']:>6} tokens: plain reordered {c['plain_reordered_ttft_s']:.3f} s, "
                  f"blend reordered {c['blend_reordered_ttft_s']:.3f} s → {c['speedup_reordered']:.2f}×; "
                  f"prefix hit {c['plain_prefix_hit_ttft_s']:.3f} s")
    try:
        plot(result, path.with_suffix(".png"))
        print(f"kvdemo.bench: wrote {path.with_suffix('.png')}")
    except ImportError:
        print("kvdemo.bench: matplotlib missing here; draw the plot with --plot-only " + str(path))
    return result


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_exit)
    try:
        run()
    except UserFacingError as exc:
        print(f"kvdemo.bench: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
