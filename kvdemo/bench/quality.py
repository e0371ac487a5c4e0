"""The quality case of the benchmark: does 🚀's blended answer match 🐢's full prefill of the same ids?

    python -m kvdemo.bench --quality --model DIR --max-model-len 8192 \\
        [--ratios 0.02,0.05,0.10,0.15,0.30,0.50,1.0] [--baseline-fixes all,-mask] [--equivalence-ratios 1.0,0.15] \\
        [--equivalence-bound 0.003] [--quality-contexts 8000,16000,30000] [--answer-max-tokens 128] \\
        [--bootstrap-draws 2000] [--bootstrap-seed 0] [--model-meta FILE]

Engines, started by the same process manager as the app (one GPU is enough for a small real model):
🐢 plain vLLM (the reference, with ``VLLM_SERVER_DEV_MODE=1`` for ``POST /reset_prefix_cache``), one 🚀 LMCache
engine per recompute ratio with the plugin's default fixes, the same again with ``--baseline-fixes`` (e.g.
without the mask fix: the "before" sweep), and LMCache engines with only the fixes blending needs (+ the
answer-changing ones, and ``telemetry`` for the evidence) at ``--equivalence-ratios`` (fix equivalence of the
speed fixes). Every LMCache engine precomputes the whole chunk library.

Prompts: a question from data/quality_questions.jsonl over its chunk plus random others, random order, per
context size (``--quality-context`` min,max, or each ``--quality-contexts`` target's band,
kvdemo.quality.context_band). Per prompt, every request greedy with top-20 log-probs and ``ignore_eos``:

- reference: 🐢 *cold*, its prefix cache reset before each request: the answer (``--answer-max-tokens``), then
  the next token after 8, 16 and 32 of its answer tokens appended to the prompt;
- control: the same requests again right after, each a prefix hit on the blocks the reference left (cold vs
  prefix hit: the floor of every column);
- each 🚀 engine: the same requests blended (``lmcache.skip_save``, as the app sends questions), each prompt as
  soon as its reference is in (all engines at once: separate processes, so no answer changes).

Every request reports its cached prompt tokens (``cold_check``) and carries an ``X-Request-Id`` starting with
``kvq-``, which finds its LMCache telemetry record (``evidence``: per-request exact-mask and fallback counts).
Metrics: kvdemo.quality; summaries and paired comparisons: quality_report.py. TTFTs come from a separate
pass, one request at a time, chunks in reverse order and another question, 🐢's prefix cache reset before
each of its requests (it pays its whole prefill). Writes benchmarks/results/quality-<gpu>.json + PNG, and
steps/quality-<baseline-name>-<gpu>.json.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import yaml

from .. import quality as qm
from ..config import REPO_ROOT, Settings, plan_gpus
from ..engine_handle import EngineHandle
from ..engines import EngineSpec
from ..errors import EngineError, UserFacingError
from ..precompute import PrecomputeProgress, PrecomputeRequest, precompute
from ..preflight import choose_gpus, detect_gpus
from ..revision import source_revision
from ..runtime import Runtime
from ..scenarios.blend import PLAIN_LABEL
from ..telemetry import record_mode
from ..vllm_plugin import ALL_FIXES, ANSWER_FIXES, REQUIRED_FIXES
from . import quality_report as report
from .job import token_counts
from .measure import versions
from .model_meta import MODEL_META_FILE, meta_fields, model_meta
from .protocol import engine_log_lines
from .quality_report import CONTROL, FULL, AnswerScore, Context, Variant
from .write import gpu_slug

log = logging.getLogger(__name__)

DEFAULT_RATIOS = "0.02,0.05,0.10,0.15,0.30,0.50,1.0"
TIMING_PROMPTS = 8  # per context
QUALITY_KV_CACHE_GIB = 2.0  # per engine: a 135M model's 8K-token requests need far less
QUALITY_CPU_CACHE_GIB = 2  # LMCache's pinned CPU memory per engine: the whole library fits
QUESTIONS_FILE = qm.QUESTIONS_FILE
DEFAULT_FIXES = "all"
# Fixes blending needs + the answer-changing ones, + telemetry: it changes no number and its per-request
# records are the evidence of what the mask fix did.
EVIDENCE_FIXES = ("telemetry",)
MINIMAL_FIXES = ",".join(REQUIRED_FIXES + ANSWER_FIXES + EVIDENCE_FIXES)
RESET_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # vLLM serves POST /reset_prefix_cache only in dev mode
REQUEST_TAG = "kvq-"  # X-Request-Id prefix of the harness's scored requests
TELEMETRY_WAIT_S = 10.0  # the plugin writes a record once the load's GPU work is done
STOP_TOKENS = ("</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")  # end-of-turn, if in vocab
# A warning or error of the plugin in an engine log: its handler's "LEVEL <time> [kvdemo] ...", vLLM's process
# prefix allowed before it; or "LEVEL kvdemo.<logger>: ..." where a root handler formats it.
KVDEMO_WARNING = re.compile(r"\b(?:WARNING|ERROR|CRITICAL)\b(?:[^\[]*\[kvdemo\]|\s+kvdemo[.\w]*:)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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


def parse_contexts(a, max_model_len: int) -> list[tuple[str, int | None, tuple[int, int]]]:
    """(label, target, (min, max)) per context size: each ``--quality-contexts`` target's band, else the one
    ``--quality-context`` band; the max is capped to what ``--max-model-len`` leaves for the answer."""
    budget = qm.prompt_budget(max_model_len, a.answer_max_tokens)
    if a.quality_contexts.strip():
        targets = token_counts("--quality-contexts", a.quality_contexts)
        out = [(str(t), t, qm.context_band(t)) for t in dict.fromkeys(targets)]
    else:
        bounds = token_counts("--quality-context", a.quality_context)
        if len(bounds) != 2 or bounds[0] > bounds[1]:
            raise UserFacingError(f"--quality-context takes min,max tokens, e.g. 4000,7000 (got {a.quality_context!r}).")
        out = [(f"{bounds[0]}-{bounds[1]}", None, (bounds[0], bounds[1]))]
    for label, _, (lo, _hi) in out:
        if lo > budget:
            raise UserFacingError(f"context {label}: prompts of {lo}+ tokens and {a.answer_max_tokens} answer tokens "
                                  f"need --max-model-len ≥ {lo + max_model_len - budget}.")
    return [(label, target, (lo, min(hi, budget))) for label, target, (lo, hi) in out]


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
    """🐢 first (with :data:`RESET_ENV`), then one 🚀 per variant, all on the given GPUs (round-robin);
    --engine-ports first, then ports counting up from the last one given."""
    slots = plan_gpus(1 + len(variants), [] if settings.simulate else gpus)
    given = list(settings.engine_ports)
    ports = given + [given[-1] + i for i in range(1, 2 + len(variants) - len(given))]
    common = {"model": settings.model, "max_model_len": settings.max_model_len, "simulate": settings.simulate,
              "extra_args": settings.engine_args, "gpu_memory_utilization": settings.gpu_memory_utilization,
              "kv_cache_gib": settings.kv_cache_gib or QUALITY_KV_CACHE_GIB, "local_model": settings.is_local_model,
              "sim_speed": settings.sim_speed}
    specs = [EngineSpec(key="plain", label=PLAIN_LABEL, lmcache=False, port=ports[0], slot=slots[0],
                        extra_env=dict(RESET_ENV), **common)]
    for i, v in enumerate(variants, 1):
        specs.append(EngineSpec(key=v.key, label=f"🚀 LMCache ratio {v.ratio:g} ({v.group} fixes)", lmcache=True,
                                port=ports[i], slot=slots[i],
                                lmcache_config=write_variant_config(settings.lmcache_config_path, v, config_dir),
                                extra_env={"KVDEMO_PLUGIN_FIXES": v.fixes}, **common))
    return specs


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    tokens: list[int]
    first_top: dict[int, float]
    cached_tokens: int  # prompt tokens the engine reused (vLLM omits the details when there were none)


class Scorer:
    """The harness's requests to one engine over HTTP: token ids in, greedy token ids and top-k log-probs out."""

    def __init__(self, handle: EngineHandle, http: httpx.AsyncClient) -> None:
        self.handle = handle
        self.http = http

    async def _send(self, method: str, path: str, **kw) -> httpx.Response:
        spec = self.handle.spec
        try:
            response = await self.http.request(method, spec.url + path, **kw)
        except httpx.HTTPError as exc:
            raise EngineError(f"{spec.label} at {spec.url} does not answer ({type(exc).__name__}).", spec.key) from exc
        if response.status_code != 200:
            raise EngineError(f"{spec.label}: {method} {path} answered HTTP {response.status_code} "
                              f"{response.text[:300]}", spec.key)
        return response

    async def model(self) -> str:
        if self.handle.model_name is None:
            self.handle.model_name = (await self._send("GET", "/v1/models")).json()["data"][0]["id"]
        return self.handle.model_name

    async def reply(self, ids: list[int], max_tokens: int, request_id: str) -> Reply:
        """Exactly ``max_tokens`` greedy tokens (``ignore_eos``) with each one's top-k log-probs."""
        body: dict = {"model": await self.model(), "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
                      "logprobs": qm.TOP_K, "return_tokens_as_token_ids": True, "ignore_eos": True}
        if self.handle.spec.lmcache:
            body["kv_transfer_params"] = {"lmcache.skip_save": True}
        data = (await self._send("POST", "/v1/completions", json=body, headers={"X-Request-Id": request_id})).json()
        lp = data["choices"][0].get("logprobs") or {}
        if not lp.get("tokens") or not lp.get("top_logprobs"):
            raise EngineError(f"{self.handle.spec.label} returned no log-probs.", self.handle.spec.key)
        details = (data.get("usage") or {}).get("prompt_tokens_details") or {}
        return Reply([qm.parse_token(t) for t in lp["tokens"]], qm.parse_top_logprobs(lp["top_logprobs"][0]),
                     int(details.get("cached_tokens") or 0))

    async def reset_prefix_cache(self) -> None:
        await self._send("POST", "/reset_prefix_cache")


@dataclass
class Answer:
    scored: qm.Scored  # every generated token, and the first one's top-k
    at: dict[int, dict[int, float]]  # appended answer tokens → top-k of the next token
    cached_tokens: list[int]  # per request: the answer, then each appended one


async def answer(scorer: Scorer, ids: list[int], reference_tokens: list[int] | None, tag: str, max_tokens: int,
                 cold: bool = False) -> Answer:
    """The answer, then the next token with 8/16/32 of the reference's answer tokens appended (its own when
    ``reference_tokens`` is None); ``cold``: the engine's prefix cache is reset before each request."""
    cached: list[int] = []

    async def one(prompt: list[int], n: int, kind: str) -> Reply:
        if cold:
            await scorer.reset_prefix_cache()
        r = await scorer.reply(prompt, n, f"{REQUEST_TAG}{tag}-{kind}-{uuid.uuid4().hex[:8]}")
        cached.append(r.cached_tokens)
        return r

    first = await one(ids, max_tokens, "answer")
    ref = reference_tokens if reference_tokens is not None else first.tokens
    at = {n: (await one(ids + ref[:n], 1, f"at{n}")).first_top for n in qm.APPENDED}
    return Answer(qm.Scored(first.tokens, first.first_top), at, cached)


async def reference_pass(plain: EngineHandle, prompts: list[list[int]], max_tokens: int,
                         ready: list[asyncio.Future]) -> tuple[list[Answer], list[Answer]]:
    """🐢 on every prompt: cold (the reference), then the same requests again (prefix hits: the control).
    ``ready[i]`` gets prompt i's reference as soon as it is in (the 🚀 engines start on it), or this pass's
    error."""
    refs, controls = [], []
    try:
        async with httpx.AsyncClient(timeout=600.0) as http:
            scorer = Scorer(plain, http)
            for i, ids in enumerate(prompts):
                ref = await answer(scorer, ids, None, f"plain-p{i}-ref", max_tokens, cold=True)
                refs.append(ref)
                ready[i].set_result(ref)
                controls.append(await answer(scorer, ids, ref.scored.tokens, f"plain-p{i}-control", max_tokens))
                if (i + 1) % 10 == 0:
                    print(f"kvdemo.bench: quality reference {i + 1}/{len(prompts)}", flush=True)
    except BaseException as exc:
        for future in ready:
            if not future.done():
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
        raise
    return refs, controls


async def blended_pass(handle: EngineHandle, prompts: list[list[int]], refs: list[asyncio.Future],
                       max_tokens: int) -> list[Answer]:
    """One 🚀 engine on every prompt, each as soon as its reference (``refs[i]``) is in."""
    async with httpx.AsyncClient(timeout=600.0) as http:
        scorer = Scorer(handle, http)
        return [await answer(scorer, ids, (await ref).scored.tokens, f"{handle.spec.key}-p{i}", max_tokens)
                for i, (ids, ref) in enumerate(zip(prompts, refs))]


async def measure_all(plain: EngineHandle, blended: list[EngineHandle], prompts: list[list[int]],
                      max_tokens: int) -> tuple[list[Answer], list[Answer], list[list[Answer]]]:
    """The reference pass and every 🚀 engine's pass at once, each 🚀 request after its prompt's reference:
    (references, controls, answers per 🚀 engine). The engines are separate processes, so running them
    together changes no answer, only the wall time."""
    loop = asyncio.get_running_loop()
    ready = [loop.create_future() for _ in prompts]
    reference = asyncio.create_task(reference_pass(plain, prompts, max_tokens, ready))
    try:
        answers = await asyncio.gather(*(blended_pass(h, prompts, ready, max_tokens) for h in blended))
        refs, controls = await reference
    finally:
        if not reference.done():
            reference.cancel()
            await asyncio.gather(reference, return_exceptions=True)
        for future in ready:  # a failed reference pass: its error is raised once, not per engine
            if future.done() and not future.cancelled():
                future.exception()
    return refs, controls, list(answers)


async def timing_pass(engines: list[EngineHandle], prompts: list[list[int]]) -> dict[str, float]:
    """Median TTFT per engine, one request at a time over all engines; 🐢's prefix cache is reset before each
    of its requests, so it pays its whole prefill."""
    ttfts: dict[str, list[float]] = {h.spec.key: [] for h in engines}
    clients = {h.spec.key: h.client() for h in engines}
    try:
        async with httpx.AsyncClient(timeout=600.0) as http:
            for ids in prompts:
                for h in engines:
                    if not h.spec.lmcache:
                        await Scorer(h, http).reset_prefix_cache()
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
# Answer text and evidence
# --------------------------------------------------------------------------------------------------


def stop_token_ids(tokenizer) -> set[int]:
    """The tokenizer's end-of-sequence id and the end-of-turn tokens of :data:`STOP_TOKENS` it has."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in STOP_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def score_answer(tokenizer, stop_ids: set[int], tokens: list[int], question: qm.Question,
                 headings: list[str]) -> AnswerScore:
    """The answer text (greedy tokens up to the first stop token) scored against the question set."""
    text = tokenizer.decode(qm.until_stop(tokens, stop_ids), skip_special_tokens=True).strip()
    return AnswerScore(text, qm.token_f1(text, question.answer), qm.cites_chunk(text, headings))


def kvdemo_warnings(lines: list[str]) -> list[str]:
    """The plugin's WARNING/ERROR lines of an engine log (:data:`KVDEMO_WARNING`), colour codes removed."""
    out = []
    for line in lines:
        plain = _ANSI.sub("", line)
        if KVDEMO_WARNING.search(plain):
            out.append(plain.strip()[:300])
    return out


def telemetry_counts(directory: Path | None, tag: str = REQUEST_TAG) -> dict:
    """Per-request evidence from an LMCache engine's telemetry records (kvdemo.lmcache_patches.telemetry) of
    the requests whose id carries ``tag``: how many were recorded, blended, computed attention with the exact
    mask in some layer, fell back to LMCache's call in some layer, or carry no mask counts at all."""
    out = {"recorded": 0, "blended": 0, "exact_mask": 0, "mask_fallback": 0, "without_mask_counts": 0}
    for path in sorted(directory.glob("lmcache-*.jsonl")) if directory and directory.is_dir() else []:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if tag not in str(rec.get("req_id", "")):
                continue
            out["recorded"] += 1
            out["blended"] += record_mode(rec) == "blend"
            if "exact_mask_layers" not in rec:
                out["without_mask_counts"] += 1
                continue
            out["exact_mask"] += (rec.get("exact_mask_layers") or 0) > 0
            out["mask_fallback"] += (rec.get("mask_fallback_layers") or 0) > 0
    return out


def _evidence(runtime: Runtime, measured_requests: int, per_pattern: int = 2) -> dict[str, dict]:
    """Per 🚀 engine: a few log lines of what it did, every plugin warning, and per-request telemetry counts of
    the measured requests (waiting up to :data:`TELEMETRY_WAIT_S` for the last records)."""
    patterns = ("kvdemo plugin: applied", "kvdemo plugin: mask", "LMCache hit tokens", "Number of indices picked",
                "Retrieved")
    engines = runtime.engines[1:]
    dirs = {h.spec.key: h.process.telemetry_dir if h.process else None for h in engines}
    deadline = time.monotonic() + TELEMETRY_WAIT_S
    counts = {k: telemetry_counts(d) for k, d in dirs.items()}
    while any(c["recorded"] < measured_requests for c in counts.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
        counts = {k: telemetry_counts(d) for k, d in dirs.items()}
    out = {}
    for h in engines:
        lines = engine_log_lines(h)
        warnings = kvdemo_warnings(lines)
        out[h.spec.key] = {"log_lines": [ln for p in patterns for ln in [x for x in lines if p in x][:per_pattern]],
                           "kvdemo_warnings": warnings[:20], "kvdemo_warning_count": len(warnings),
                           "requests": {"measured": measured_requests, **counts[h.spec.key]}}
    return out


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------


def run_quality(a, settings: Settings, argv_text: str) -> dict:
    """Start the engines, measure, write JSON(s) + PNG; returns the headline result."""
    ratios = parse_ratios("--ratios", a.ratios)
    eq_ratios = parse_ratios("--equivalence-ratios", a.equivalence_ratios) if a.equivalence_ratios.strip() else []
    variants = plan_variants(ratios, a.baseline_fixes or None, eq_ratios)
    if a.prompts < 1:
        raise UserFacingError("--prompts must be at least 1.")
    if a.answer_max_tokens < qm.ANSWER_TOKENS:
        raise UserFacingError(f"--answer-max-tokens must be at least {qm.ANSWER_TOKENS} (the compared tokens).")
    if a.bootstrap_draws < 100:
        raise UserFacingError("--bootstrap-draws must be at least 100.")
    if a.equivalence_bound <= 0:
        raise UserFacingError("--equivalence-bound takes a positive number of nats, e.g. 0.003.")
    bands = parse_contexts(a, settings.max_model_len)
    boot = qm.Bootstrap(draws=a.bootstrap_draws, seed=a.bootstrap_seed)
    meta = model_meta(settings.model, a.model_meta or None)
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
        prompts: list[qm.QualityPrompt] = []
        ids: list[list[int]] = []
        contexts: list[Context] = []
        for label, target, (lo, hi) in bands:
            try:
                sampled = qm.sample_prompts(questions, chunk_tokens, qm.prompt_overhead(builder), a.prompts, lo, hi,
                                            seed=a.seed)
            except ValueError as exc:
                raise UserFacingError(f"context {label}: {exc}.") from exc
            built = [builder.build(list(p.chunks), p.question.question) for p in sampled]
            contexts.append(Context(label, target, (lo, hi), len(ids), tuple(map(len, built))))
            prompts += sampled
            ids += built
        plain = runtime.engines[0]
        blended = {h.spec.key: h for h in runtime.engines[1:]}
        print(f"kvdemo.bench: quality: {len(ids)} prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens "
              f"({', '.join(c.label for c in contexts)}), {len(blended)} LMCache engines + plain", flush=True)
        warm = builder.build(list(prompts[0].chunks)[::-1], "Warm-up: answer with one word.")
        pre_s = precompute_all(list(blended.values()), runtime.precompute_prompts(), warm)
        print(f"kvdemo.bench: precomputed the library on every LMCache engine in {pre_s:.1f} s", flush=True)

        t_measure = time.monotonic()
        refs, controls, answer_lists = asyncio.run(measure_all(plain, list(blended.values()), ids,
                                                               a.answer_max_tokens))
        answers = dict(zip(blended, answer_lists))
        measure_s = time.monotonic() - t_measure
        ttft = {}
        for ctx in contexts:
            timing_ids = [builder.build(list(p.chunks)[::-1], p.question.question + " (timing)")
                          for p in ctx.pick(prompts)[:TIMING_PROMPTS]]
            ttft[ctx.label] = asyncio.run(timing_pass(runtime.engines, timing_ids))
        device = "SIMULATED (no GPU)" if settings.simulate else ((detect_gpus() or [None])[0] or "unknown")
        device = getattr(device, "name", device)
        evidence = _evidence(runtime, len(ids) * (1 + len(qm.APPENDED)))
        tokenizer = builder.tokenizer
        stops = stop_token_ids(tokenizer)
    finally:
        runtime.stop()

    headings = {name: qm.chunk_headings(chunk.text) for name, chunk in runtime.library.chunks.items()}

    def scored(all_answers: list[Answer]) -> list[AnswerScore]:
        return [score_answer(tokenizer, stops, ans.scored.tokens, p.question, headings[p.question.chunk])
                for ans, p in zip(all_answers, prompts)]

    texts = {FULL: scored(refs), CONTROL: scored(controls), **{k: scored(v) for k, v in answers.items()}}
    results = {key: [replace(qm.compare(r.scored, o.scored, r.at, o.at), f1=s.f1, cited=s.cited)
                     for r, o, s in zip(refs, others, texts[key])]
               for key, others in {CONTROL: controls, **answers}.items()}
    cached = {FULL: [r.cached_tokens for r in refs], CONTROL: [c.cached_tokens for c in controls],
              **{k: [x.cached_tokens for x in v] for k, v in answers.items()}}
    full_scores = qm.answer_summary([s.f1 for s in texts[FULL]], [s.cited for s in texts[FULL]], boot)
    base = {
        "device": device, **({"simulated": True} if settings.simulate else {}),
        "versions": versions(), **source_revision(), "model": settings.model,
        **meta_fields(meta),
        "weights": "simulated" if settings.simulate else (
            "dummy" if "dummy" in " ".join(settings.engine_args) else "real"),
        "command": "python -m kvdemo.bench " + argv_text,
        "kvdemo_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("KVDEMO_")},
        "n_prompts": len(ids), "context_tokens": report.token_stats([len(i) for i in ids]),
        "contexts": [report.context_summary(c, results, texts[FULL], boot) for c in contexts],
        "answer_tokens": qm.ANSWER_TOKENS, "answer_max_tokens": a.answer_max_tokens, "top_k": qm.TOP_K,
        "appended": list(qm.APPENDED),
        "metrics": {"first_token_kl": "KL of both next-token distributions coarsened to the reference's top-k "
                                      "tokens + one rest bucket (>= 0, a lower bound of the full KL)",
                    "first_token_kl_partial_topk": "the former first_token_kl (partial sum over the reference's "
                                                   "top-k; can be negative), kept for one release",
                    "f1": "SQuAD token F1 of the answer text against the question set's answer",
                    "cite_acc": "share of answers naming a heading of the chunk that answers the question"},
        "bootstrap": boot.as_json(),
        "reference": "🐢 plain vLLM, cold: its prefix cache reset before each of its requests",
        "control_construction": "🐢 again right after the reference, the same requests, each a prefix hit on "
                                "the blocks the reference left (cold vs prefix hit)",
        "cold_check": report.cold_check(cached),
        "control": qm.summarize(results[CONTROL], boot),
        "f1_full": full_scores["f1"], "f1_full_ci": full_scores["f1_ci"],
        "cite_acc_full": full_scores["cite_acc"], "cite_acc_full_ci": full_scores["cite_acc_ci"],
        "ttft": "median over the first prompts of each context, one request at a time, chunks reversed and "
                "another question; 🐢's prefix cache reset before each of its requests",
        "lmcache_config": settings.lmcache_config_path.read_text(),
        "engine_args": settings.engine_args,
        "wall_s": {"total": time.monotonic() - t_start, "measure": measure_s},
        "prompts": [{"context": c.label, "question": p.question.qid, "chunks": list(p.chunks), "tokens": len(i)}
                    for c in contexts for p, i in zip(c.pick(prompts), c.pick(ids))],
        "evidence": evidence,
    }

    def keys(*groups: str) -> list[str]:
        return [FULL, CONTROL] + [v.key for v in variants if v.group in groups]

    speed_fixes = [f for f in ALL_FIXES if f not in MINIMAL_FIXES.split(",")]
    result = {**base, "fixes": DEFAULT_FIXES,
              "sweep": report.sweep_rows("default", contexts, variants, results, texts[FULL], ttft, boot),
              "fix_equivalence": report.fix_equivalence(contexts, variants, results, boot, a.equivalence_bound,
                                                        speed_fixes),
              "per_prompt": report.per_prompt(results, texts, cached, keys("default", "minimal", "baseline"))}
    slug = gpu_slug(device) if not settings.simulate else "simulated"
    out.mkdir(parents=True, exist_ok=True)
    baseline_path = None
    if a.baseline_fixes:
        baseline_rows = report.sweep_rows("baseline", contexts, variants, results, texts[FULL], ttft, boot)
        baseline = {**base, "fixes": a.baseline_fixes, "sweep": baseline_rows,
                    "per_prompt": report.per_prompt(results, texts, cached, keys("baseline")),
                    "note": f"the same prompts, engines and machine as {a.name}-{slug}.json, "
                            f"with KVDEMO_PLUGIN_FIXES={a.baseline_fixes}"}
        baseline_path = out / "steps" / f"{a.name}-{a.baseline_name}-{slug}.json"
        baseline_path.parent.mkdir(parents=True, exist_ok=True)
        baseline_path.write_text(json.dumps(baseline, indent=1) + "\n")
        result["baseline"] = {"fixes": a.baseline_fixes, "file": str(baseline_path.relative_to(out))}
        result["baseline_sweep"] = baseline_rows
        result["mask_comparison"] = report.mask_comparison(contexts, variants, results, boot)
    path = out / f"{a.name}-{slug}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"kvdemo.bench: wrote {path}" + (f" and {baseline_path}" if baseline_path else ""))
    report.print_table(result)
    try:
        report.plot_quality(result, path.with_suffix(".png"))
        print(f"kvdemo.bench: wrote {path.with_suffix('.png')}")
    except ImportError:
        print("kvdemo.bench: matplotlib missing here; no plot")
    return result


def add_quality_flags(p) -> None:
    g = p.add_argument_group("quality (--quality)")
    g.add_argument("--quality", action="store_true", help="measure answer quality of blending instead of TTFT")
    g.add_argument("--ratios", default=DEFAULT_RATIOS, help="blend_recompute_ratios to sweep, one engine each")
    g.add_argument("--baseline-fixes", default="",
                   help="also sweep with these KVDEMO_PLUGIN_FIXES (e.g. all,-mask): the before/after comparison")
    g.add_argument("--baseline-name", default="nomask", help="file tag of the baseline sweep (steps/)")
    g.add_argument("--equivalence-ratios", default="1.0,0.15",
                   help=f"ratios at which fixes {MINIMAL_FIXES} are compared with all fixes (empty: none)")
    g.add_argument("--equivalence-bound", type=float, default=qm.EQUIVALENCE_BOUND_NATS,
                   help="fix equivalence passes when the paired KL difference's interval lies within ± this (nats)")
    g.add_argument("--prompts", type=int, default=40, help="number of prompts (per context size)")
    g.add_argument("--quality-context", default=",".join(map(str, qm.DEFAULT_QUALITY_CONTEXT)),
                   help="min,max context tokens of a prompt (one context size)")
    g.add_argument("--quality-contexts", default="",
                   help="context sizes in tokens, e.g. 8000,16000,30000: each a band around the target "
                        "(replaces --quality-context)")
    g.add_argument("--answer-max-tokens", type=int, default=qm.ANSWER_MAX_TOKENS,
                   help="greedy tokens per answer; its text up to the end-of-sequence token is scored (F1, citation)")
    g.add_argument("--bootstrap-draws", type=int, default=qm.BOOTSTRAP_DRAWS, help="bootstrap resamples of the prompts")
    g.add_argument("--bootstrap-seed", type=int, default=qm.BOOTSTRAP_SEED, help="bootstrap seed")
    g.add_argument("--model-meta", default="",
                   help=f"JSON object passed through to the result (default: <model dir>/{MODEL_META_FILE} if present)")
    g.add_argument("--questions", default=str(QUESTIONS_FILE), help="question set (JSON lines)")
    g.add_argument("--seed", type=int, default=0, help="prompt sampling seed")


def quoted_argv(argv: list[str] | None) -> str:
    return shlex.join(sys.argv[1:] if argv is None else argv)
