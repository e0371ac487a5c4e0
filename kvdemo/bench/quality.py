"""The quality case of the benchmark: does 🚀's blended answer match 🐢's full prefill of the same ids?

    python -m kvdemo.bench --quality --model DIR --max-model-len 8192 \\
        [--ratios 0.02,0.05,0.10,0.15,0.30,0.50,1.0] [--baseline-fixes all,-mask] [--equivalence-ratios 1.0,0.15]

Engines, started by the same process manager as the app (one GPU is enough for a small real model):
🐢 plain vLLM (the reference), one 🚀 LMCache engine per recompute ratio with the plugin's default fixes,
the same again with ``--baseline-fixes`` (e.g. without the mask fix: the "before" sweep), and LMCache
engines with only the fixes blending needs (+ the answer-changing ones) at ``--equivalence-ratios`` (fix
equivalence of the speed fixes). Every LMCache engine precomputes the whole chunk library.

Per prompt (a question from data/quality_questions.jsonl over its chunk plus random others, random
order, ~4–7K tokens): 🐢 answers twice (cold, then prefix hit: the control), 32 greedy tokens with top-20
log-probs; 8, 16 and 32 of its answer tokens are appended to the question and scored again (one token).
Each 🚀 engine answers the same ids blended (``lmcache.skip_save``, as the app sends questions). Metrics:
kvdemo.quality. TTFTs come from a separate pass, one request at a time, chunks in a new order.
Writes benchmarks/results/quality-<gpu>.json + PNG, and steps/quality-<baseline-name>-<gpu>.json.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import quality as qm
from ..client import EngineClient
from ..config import REPO_ROOT, Settings, plan_gpus
from ..engine_handle import EngineHandle
from ..engines import EngineSpec
from ..errors import UserFacingError
from ..precompute import PrecomputeProgress, PrecomputeRequest, precompute
from ..preflight import choose_gpus, detect_gpus
from ..runtime import Runtime
from ..scenarios.blend import PLAIN_LABEL
from ..vllm_plugin import ALL_FIXES, ANSWER_FIXES, REQUIRED_FIXES
from .job import token_counts
from .measure import versions
from .protocol import engine_log_lines
from .write import gpu_slug

log = logging.getLogger(__name__)

DEFAULT_RATIOS = "0.02,0.05,0.10,0.15,0.30,0.50,1.0"
APPENDED = (8, 16, 32)
ANSWER_TOKENS = 32
TOP_K = 20
TIMING_PROMPTS = 8
QUALITY_KV_CACHE_GIB = 2.0  # per engine: a 135M model's 8K-token requests need far less
QUALITY_CPU_CACHE_GIB = 2  # LMCache's pinned CPU memory per engine: the whole library fits
QUESTIONS_FILE = REPO_ROOT / "data" / "quality_questions.jsonl"
DEFAULT_FIXES = "all"
MINIMAL_FIXES = ",".join(REQUIRED_FIXES + ANSWER_FIXES)


@dataclass(frozen=True)
class Variant:
    """One 🚀 engine of the sweep: its recompute ratio and the plugin fixes it runs with."""

    key: str
    ratio: float
    fixes: str
    group: str  # "default", "baseline" or "minimal"


def plan_variants(ratios: list[float], baseline_fixes: str | None, equivalence_ratios: list[float]) -> list[Variant]:
    missing = [r for r in equivalence_ratios if r not in ratios]
    if missing:
        raise UserFacingError(f"--equivalence-ratios {missing} must also be in --ratios (they compare against it).")
    variants = [Variant(f"r{r:g}", r, DEFAULT_FIXES, "default") for r in ratios]
    if baseline_fixes:
        variants += [Variant(f"r{r:g}-baseline", r, baseline_fixes, "baseline") for r in ratios]
    variants += [Variant(f"r{r:g}-minimal", r, MINIMAL_FIXES, "minimal") for r in equivalence_ratios]
    return variants


def parse_ratios(flag: str, text: str) -> list[float]:
    """``0.15,1.0`` → [0.15, 1.0]; anything but ratios in (0, 1] is a one-line error naming the flag."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < v <= 1 for v in values):
        raise UserFacingError(f"{flag} takes recompute ratios in (0, 1] separated by commas, e.g. 0.15,1.0 "
                              f"(got {text!r}).")
    return values


def write_variant_config(base: Path, variant: Variant, out_dir: Path) -> Path:
    """The app's LMCache yaml with this variant's ratio (and a CPU cache sized for many engines)."""
    data = yaml.safe_load(base.read_text()) or {}
    data["blend_recompute_ratios"] = [variant.ratio]
    data["max_local_cpu_size"] = min(float(data.get("max_local_cpu_size", QUALITY_CPU_CACHE_GIB)),
                                     QUALITY_CPU_CACHE_GIB)
    path = out_dir / f"lmcache-{variant.key}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def engine_specs(settings: Settings, gpus: list[int], variants: list[Variant], config_dir: Path) -> list[EngineSpec]:
    """🐢 first, then one 🚀 per variant, all on the given GPUs (round-robin); --engine-ports first, then
    ports counting up from the last one given."""
    slots = plan_gpus(1 + len(variants), [] if settings.simulate else gpus)
    given = list(settings.engine_ports)
    ports = given + [given[-1] + i for i in range(1, 2 + len(variants) - len(given))]
    common = {"model": settings.model, "max_model_len": settings.max_model_len, "simulate": settings.simulate,
              "extra_args": settings.engine_args, "gpu_memory_utilization": settings.gpu_memory_utilization,
              "kv_cache_gib": settings.kv_cache_gib or QUALITY_KV_CACHE_GIB, "local_model": settings.is_local_model,
              "sim_speed": settings.sim_speed}
    specs = [EngineSpec(key="plain", label=PLAIN_LABEL, lmcache=False, port=ports[0], slot=slots[0], **common)]
    for i, v in enumerate(variants, 1):
        specs.append(EngineSpec(key=v.key, label=f"🚀 LMCache ratio {v.ratio:g} ({v.group} fixes)", lmcache=True,
                                port=ports[i], slot=slots[i],
                                lmcache_config=write_variant_config(settings.lmcache_config_path, v, config_dir),
                                extra_env={"KVDEMO_PLUGIN_FIXES": v.fixes}, **common))
    return specs


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    scored: qm.Scored
    at: dict[int, dict[int, float]]  # appended answer tokens → top-k of the next token


async def score(client: EngineClient, ids: list[int], max_tokens: int, skip_save: bool) -> qm.Scored:
    tokens, tops = await client.scored(ids, max_tokens, TOP_K, skip_save=skip_save)
    return qm.Scored([qm.parse_token(t) for t in tokens], qm.parse_top_logprobs(tops[0]))


async def answer(client: EngineClient, ids: list[int], reference_tokens: list[int] | None,
                 skip_save: bool) -> Answer:
    """32 greedy tokens, then the next-token log-probs with 8/16/32 of the reference's tokens appended."""
    first = await score(client, ids, ANSWER_TOKENS, skip_save)
    ref = reference_tokens if reference_tokens is not None else first.tokens
    at = {}
    for n in APPENDED:
        at[n] = (await score(client, ids + ref[:n], 1, skip_save)).first_top
    return Answer(first, at)


async def reference_pass(plain: EngineHandle, prompts: list[list[int]]) -> tuple[list[Answer], list[Answer]]:
    """🐢 on every prompt: cold (the reference), then the same requests again (prefix hits: the control)."""
    client = plain.client()
    refs, controls = [], []
    try:
        for i, ids in enumerate(prompts):
            ref = await answer(client, ids, None, skip_save=False)
            refs.append(ref)
            controls.append(await answer(client, ids, ref.scored.tokens, skip_save=False))
            if (i + 1) % 10 == 0:
                print(f"kvdemo.bench: quality reference {i + 1}/{len(prompts)}", flush=True)
    finally:
        await client.close()
    return refs, controls


async def blended_pass(handle: EngineHandle, prompts: list[list[int]], refs: list[Answer]) -> list[Answer]:
    client = handle.client()
    try:
        return [await answer(client, ids, ref.scored.tokens, skip_save=True) for ids, ref in zip(prompts, refs)]
    finally:
        await client.close()


def compare_all(refs: list[Answer], others: list[Answer]) -> list[qm.PromptResult]:
    return [qm.compare(r.scored, o.scored, r.at, o.at) for r, o in zip(refs, others)]


async def timing_pass(engines: list[EngineHandle], prompts: list[list[int]]) -> dict[str, float]:
    """Median TTFT per engine, one request at a time over all engines (nothing else runs meanwhile)."""
    ttfts: dict[str, list[float]] = {h.spec.key: [] for h in engines}
    clients = {h.spec.key: h.client() for h in engines}
    try:
        for ids in prompts:
            for h in engines:
                _, stats = await clients[h.spec.key].complete(ids, max_tokens=1, skip_save=h.spec.lmcache)
                ttfts[h.spec.key].append(stats.ttft_s)
    finally:
        for c in clients.values():
            await c.close()
    return {k: statistics.median(v) for k, v in ttfts.items() if v}


def precompute_all(lmcache_engines: list[EngineHandle], library_prompts: list[list[int]],
                   warm_up: list[int]) -> float:
    """Every 🚀 engine stores every chunk, then blends one warm-up request (compiles what runs per blend);
    returns the seconds it took (the engines work at once)."""
    async def one(h: EngineHandle) -> None:
        client = h.client()
        try:
            reqs = [PrecomputeRequest(client, ids, False) for ids in library_prompts]
            reqs.append(PrecomputeRequest(client, warm_up, True, skip_save=True))
            await precompute(reqs, PrecomputeProgress())
        finally:
            await client.close()

    async def go() -> None:
        await asyncio.gather(*(one(h) for h in lmcache_engines))

    t0 = time.monotonic()
    asyncio.run(go())
    return time.monotonic() - t0


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------


def run_quality(a, settings: Settings, argv_text: str) -> dict:
    """Start the engines, measure, write JSON(s) + PNG; returns the headline result."""
    ratios = parse_ratios("--ratios", a.ratios)
    eq_ratios = parse_ratios("--equivalence-ratios", a.equivalence_ratios) if a.equivalence_ratios.strip() else []
    variants = plan_variants(ratios, a.baseline_fixes or None, eq_ratios)
    bounds = token_counts("--quality-context", a.quality_context)
    if len(bounds) != 2 or bounds[0] > bounds[1]:
        raise UserFacingError(f"--quality-context takes min,max tokens, e.g. 4000,7000 (got {a.quality_context!r}).")
    min_ctx, max_ctx = bounds
    if a.prompts < 1:
        raise UserFacingError("--prompts must be at least 1.")
    out = Path(a.out)
    if settings.simulate and out.resolve() == (REPO_ROOT / "benchmarks" / "results").resolve():
        raise UserFacingError("benchmarks/results holds GPU measurements only: give --out for a SIMULATED run.")
    config_dir = Path(tempfile.mkdtemp(prefix="kvdemo-quality-"))
    gpus = [] if settings.simulate else choose_gpus(settings, 1)
    specs = engine_specs(settings, gpus, variants, config_dir)
    runtime = Runtime(settings, specs=specs)
    t_start = time.monotonic()
    try:
        runtime.start()
        builder = runtime.builder
        assert builder is not None
        try:
            questions = qm.load_questions(Path(a.questions), list(runtime.library.chunks))
        except (OSError, ValueError) as exc:
            raise UserFacingError(f"Question set {a.questions}: {exc}") from exc
        sep = len(builder.sep_ids)
        chunk_tokens = {c: len(builder.chunk_ids(c)) + sep for c in runtime.library.chunks}
        fixed = len(builder.bos_ids) + len(builder.sys_ids()) + sep + 40  # + the question, about
        budget = settings.max_model_len - ANSWER_TOKENS - max(APPENDED) - 64
        prompts = qm.sample_prompts(questions, chunk_tokens, fixed, a.prompts, min_ctx, min(max_ctx, budget),
                                    seed=a.seed)
        ids = [builder.build(list(p.chunks), p.question.question) for p in prompts]
        plain = runtime.engines[0]
        blended = {h.spec.key: h for h in runtime.engines[1:]}
        print(f"kvdemo.bench: quality: {len(ids)} prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens, "
              f"{len(blended)} LMCache engines + plain", flush=True)
        warm = builder.build(list(prompts[0].chunks)[::-1], "Warm-up: answer with one word.")
        pre_s = precompute_all(list(blended.values()), runtime.precompute_prompts(), warm)
        print(f"kvdemo.bench: precomputed the library on every LMCache engine in {pre_s:.1f} s", flush=True)

        async def measure():
            refs, controls = await reference_pass(plain, ids)
            answers = await asyncio.gather(*(blended_pass(h, ids, refs) for h in blended.values()))
            return refs, controls, dict(zip(blended, answers))

        t_measure = time.monotonic()
        refs, controls, answers = asyncio.run(measure())
        measure_s = time.monotonic() - t_measure
        timing_ids = [builder.build(list(p.chunks)[::-1], p.question.question + " (timing)")
                      for p in prompts[:TIMING_PROMPTS]]
        ttft = asyncio.run(timing_pass(runtime.engines, timing_ids))
        device = "SIMULATED (no GPU)" if settings.simulate else ((detect_gpus() or [None])[0] or "unknown")
        device = getattr(device, "name", device)
        control = qm.summarize(compare_all(refs, controls))
        evidence = _evidence(runtime)
    finally:
        runtime.stop()
    base = {
        "device": device, **({"simulated": True} if settings.simulate else {}),
        "versions": versions(), "model": settings.model,
        "weights": "simulated" if settings.simulate else (
            "dummy" if "dummy" in " ".join(settings.engine_args) else "real"),
        "command": "python -m kvdemo.bench " + argv_text,
        "kvdemo_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("KVDEMO_")},
        "n_prompts": len(ids),
        "context_tokens": {"min": min(map(len, ids)), "median": statistics.median(map(len, ids)),
                           "max": max(map(len, ids))},
        "answer_tokens": ANSWER_TOKENS, "top_k": TOP_K, "appended": list(APPENDED),
        "reference": "🐢 plain vLLM, first request of each prompt (its prefix cache may hold the system prompt "
                     "and an earlier prompt's first chunk)",
        "control": control,
        "lmcache_config": settings.lmcache_config_path.read_text(),
        "engine_args": settings.engine_args,
        "wall_s": {"total": time.monotonic() - t_start, "measure": measure_s},
        "prompts": [{"question": p.question.qid, "chunks": list(p.chunks), "tokens": len(i)}
                    for p, i in zip(prompts, ids)],
        "evidence": evidence,
    }

    def sweep(group: str) -> list[dict]:
        rows = []
        for v in variants:
            if v.group != group:
                continue
            row = {"recompute_ratio": v.ratio, "fixes": v.fixes,
                   **qm.summarize(compare_all(refs, answers[v.key])),
                   "blend_ttft_s": ttft.get(v.key), "full_ttft_s": ttft.get("plain")}
            rows.append(row)
        return rows

    result = {**base, "fixes": DEFAULT_FIXES, "sweep": sweep("default"),
              "fix_equivalence": _fix_equivalence(variants, answers, control)}
    slug = gpu_slug(device) if not settings.simulate else "simulated"
    out.mkdir(parents=True, exist_ok=True)
    baseline_path = None
    if a.baseline_fixes:
        baseline = {**base, "fixes": a.baseline_fixes, "sweep": sweep("baseline"),
                    "note": f"the same prompts, engines and machine as {a.name}-{slug}.json, "
                            f"with KVDEMO_PLUGIN_FIXES={a.baseline_fixes}"}
        baseline_path = out / "steps" / f"{a.name}-{a.baseline_name}-{slug}.json"
        baseline_path.parent.mkdir(parents=True, exist_ok=True)
        baseline_path.write_text(json.dumps(baseline, indent=1) + "\n")
        result["baseline"] = {"fixes": a.baseline_fixes, "file": str(baseline_path.relative_to(out))}
        result["baseline_sweep"] = baseline["sweep"]
    path = out / f"{a.name}-{slug}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"kvdemo.bench: wrote {path}" + (f" and {baseline_path}" if baseline_path else ""))
    print_table(result)
    try:
        plot_quality(result, path.with_suffix(".png"))
        print(f"kvdemo.bench: wrote {path.with_suffix('.png')}")
    except ImportError:
        print("kvdemo.bench: matplotlib missing here; no plot")
    return result


def _fix_equivalence(variants: list[Variant], answers: dict[str, list[Answer]], control: dict) -> list[dict]:
    """Minimal fixes as the reference, default fixes compared against it, per ratio; judged by the control."""
    rows = []
    for v in variants:
        if v.group != "minimal":
            continue
        default_key = next(d.key for d in variants if d.group == "default" and d.ratio == v.ratio)
        s = qm.summarize(compare_all(answers[v.key], answers[default_key]))
        kl_ok = s["first_token_kl"] <= 2 * control["first_token_kl"]
        prefix_ok = s["mean_agree_prefix"] >= control["mean_agree_prefix_ci"][0]
        rows.append({"fixes_minimal": v.fixes, "fixes_default": DEFAULT_FIXES, "recompute_ratio": v.ratio,
                     "speed_fixes_compared": [f for f in ALL_FIXES if f not in REQUIRED_FIXES + ANSWER_FIXES],
                     **s, "kl_within_2x_control": kl_ok, "agree_prefix_within_control_ci": prefix_ok,
                     "passed": kl_ok and prefix_ok})
    return rows


def _evidence(runtime: Runtime, per_pattern: int = 2) -> dict[str, list[str]]:
    """Log lines that show what each 🚀 engine did (plugin fixes applied, blends, the exact mask in use)."""
    patterns = ("kvdemo plugin: applied", "kvdemo plugin: mask", "LMCache hit tokens", "Number of indices picked",
                "Retrieved", "WARNING kvdemo")
    out = {}
    for h in runtime.engines[1:]:
        lines = engine_log_lines(h)
        out[h.spec.key] = [ln for p in patterns for ln in [x for x in lines if p in x][:per_pattern]]
    return out


def print_table(result: dict) -> None:
    c = result["control"]
    if result.get("simulated"):
        print("  SIMULATED engines: these numbers only show that the harness runs")
    print(f"  control (🐢 cold vs hit): KL {c['first_token_kl']:.4f}, identical prefix {c['mean_agree_prefix']:.1f}"
          f"/{ANSWER_TOKENS}, identical {c['greedy32_agree']:.0%}")
    for label, rows in (("fixed", result["sweep"]), ("baseline", result.get("baseline_sweep", []))):
        for r in rows:
            print(f"  {label} ratio {r['recompute_ratio']:<5g} KL {r['first_token_kl']:.4f} "
                  f"[{r['first_token_kl_ci'][0]:.4f}, {r['first_token_kl_ci'][1]:.4f}]  prefix "
                  f"{r['mean_agree_prefix']:.1f}  identical {r['greedy32_agree']:.0%}  TTFT {r['blend_ttft_s']}")
    for e in result["fix_equivalence"]:
        print(f"  equivalence ratio {e['recompute_ratio']:g}: KL {e['first_token_kl']:.4f}, prefix "
              f"{e['mean_agree_prefix']:.1f} → {'passed' if e['passed'] else 'FAILED'}")


def plot_quality(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_pf) = plt.subplots(1, 2, figsize=(11, 4.2))
    c = result["control"]
    curves = [("with the mask fix" if "baseline_sweep" in result else "default fixes", result["sweep"], "C0")]
    if result.get("baseline_sweep"):
        curves.append((f"fixes {result['baseline']['fixes']}", result["baseline_sweep"], "C3"))
    for label, rows, color in curves:
        x = [r["recompute_ratio"] for r in rows]
        ax_kl.errorbar(x, [r["first_token_kl"] for r in rows], color=color, marker="o", capsize=3, label=label,
                       yerr=[[r["first_token_kl"] - r["first_token_kl_ci"][0] for r in rows],
                             [r["first_token_kl_ci"][1] - r["first_token_kl"] for r in rows]])
        ax_pf.errorbar(x, [r["mean_agree_prefix"] for r in rows], color=color, marker="o", capsize=3, label=label,
                       yerr=[[r["mean_agree_prefix"] - r["mean_agree_prefix_ci"][0] for r in rows],
                             [r["mean_agree_prefix_ci"][1] - r["mean_agree_prefix"] for r in rows]])
    ax_kl.axhspan(*c["first_token_kl_ci"], color="grey", alpha=0.25, label="control: plain vs plain (95 % CI)")
    ax_pf.axhspan(*c["mean_agree_prefix_ci"], color="grey", alpha=0.25, label="control: plain vs plain (95 % CI)")
    for ax in (ax_kl, ax_pf):
        ax.set_xscale("log")
        ax.set_xlabel("blend_recompute_ratios")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax_kl.set_ylabel("first-token KL vs full prefill (nats)")
    ax_pf.set_ylabel(f"identical greedy prefix (of {ANSWER_TOKENS})")
    sim = "SIMULATED — " if result.get("simulated") else ""
    fig.suptitle(f"{sim}Blended vs full prefill, {result['n_prompts']} prompts, {Path(result['model']).name} "
                 f"({result['weights']} weights), {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def add_quality_flags(p) -> None:
    g = p.add_argument_group("quality (--quality)")
    g.add_argument("--quality", action="store_true", help="measure answer quality of blending instead of TTFT")
    g.add_argument("--ratios", default=DEFAULT_RATIOS, help="blend_recompute_ratios to sweep, one engine each")
    g.add_argument("--baseline-fixes", default="",
                   help="also sweep with these KVDEMO_PLUGIN_FIXES (e.g. all,-mask): the before/after comparison")
    g.add_argument("--baseline-name", default="nomask", help="file tag of the baseline sweep (steps/)")
    g.add_argument("--equivalence-ratios", default="1.0,0.15",
                   help=f"ratios at which fixes {MINIMAL_FIXES} are compared with all fixes (empty: none)")
    g.add_argument("--prompts", type=int, default=40, help="number of prompts")
    g.add_argument("--quality-context", default="4000,7000", help="min,max context tokens of a prompt")
    g.add_argument("--questions", default=str(QUESTIONS_FILE), help="question set (JSON lines)")
    g.add_argument("--seed", type=int, default=0, help="prompt sampling seed")


def quoted_argv(argv: list[str] | None) -> str:
    return shlex.join(sys.argv[1:] if argv is None else argv)
