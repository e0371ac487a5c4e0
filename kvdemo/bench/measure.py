"""The bench's measurement: start the engines as the app does, run the scenario's cases (and traces), and
gather the result with what it was measured on."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..main import headless
from ..preflight import detect_gpus
from ..revision import source_revision
from ..runtime import Runtime
from .cases import TRACE_PRINT_KEYS, run_trace
from .job import BenchJob
from .model_meta import meta_fields, model_meta
from .protocol import engine_log_lines

EVIDENCE_PATTERNS = ("Registering vllm model", "Creating blender", "kvdemo plugin: applied", "LMCache hit tokens",
                     "Number of indices picked", "Retrieved", "kvdemo-profile")


@dataclass
class Measured:
    result: dict  # what the result JSON holds
    trace_dir: Path | None  # the raw traces of --trace-contexts, until `write` keeps them next to the result


def measure(job: BenchJob) -> Measured:
    """Start the engines, answer the app's question (or only precompute), run every case; always stop."""
    settings = job.settings
    trace_dir = Path(tempfile.mkdtemp(prefix="kvdemo-trace-")) if job.trace_contexts else None
    if trace_dir is not None:
        os.environ["KVDEMO_TRACE_DIR"] = str(trace_dir)  # read by the kvdemo plugin in the engine
    runtime = Runtime(settings)
    try:
        runtime.start()
        if not job.skip_app_question:
            headless(runtime, settings.ask or "")  # the app's own path: precompute library + answer
        else:
            runtime.precompute_and_wait()
        gpus = detect_gpus() if not settings.simulate else []
        device = "SIMULATED (no GPU)" if settings.simulate else (gpus[0].name if gpus else "unknown")
        traces: list[dict] = []
        cases = asyncio.run(_all_cases(job, runtime, trace_dir, traces))
        engine_args = " ".join(settings.engine_args)
        result = {
            "scenario": settings.scenario,
            "device": device,
            **({"simulated": True} if settings.simulate else {}),  # GPU results stay free of the word
            "versions": versions(),
            "model": settings.model,
            "model_shape": "Mistral-7B-Instruct-v0.2" if "mistral" in settings.model.lower() else settings.model,
            **meta_fields(model_meta(settings.model)),
            "weights": "simulated" if settings.simulate else ("dummy" if "dummy" in engine_args else "real"),
            "command": job.command,
            **source_revision(),
            "gpu_layout": [{"engine": h.spec.key, "gpu": h.spec.slot.gpu, "shared": h.spec.slot.shared}
                           for h in runtime.engines],
            "lmcache_config": runtime.settings.lmcache_config_path.read_text(),
            "startup_s": {h.spec.key: h.startup_s for h in runtime.engines},
            "precompute_library_s": runtime.progress.seconds - runtime.progress.warm_up_s,
            "precompute_library_requests": runtime.progress.total - runtime.progress.warm_ups,
            "warm_up_s": runtime.progress.warm_up_s,  # one request per engine after precompute (runtime.py)
            # KVDEMO_PROFILE=1 adds CUDA syncs around each phase: such a run's timings are a profile, not results
            "kvdemo_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("KVDEMO_")},
            "decode_tokens": job.decode_tokens,
            "requests": "one at a time; " + job.cases.requests,
            "kv_store": runtime.kv_store.remote_url if runtime.scenario.uses_kv_store else None,
            "kv_store_location": runtime.kv_store.location() if runtime.scenario.uses_kv_store else None,
            "cases": cases,
            **({"traces": traces} if traces else {}),
            "evidence": evidence(runtime),
            **job.cases.extra_fields(runtime),
        }
    finally:
        runtime.stop()
    return Measured(result, trace_dir)


async def _all_cases(job: BenchJob, runtime: Runtime, trace_dir: Path | None, traces: list[dict]) -> list[dict]:
    """A warm-up repeat at the largest context, then `repeats` per context size; then the traces, if any."""
    repeat = job.cases.repeat
    await repeat(runtime, max(job.contexts), job.decode_tokens, "warmup-" + uuid.uuid4().hex[:6])
    cases = []
    for ctx in job.contexts:
        repeats = []
        for i in range(job.repeats):
            rep = await repeat(runtime, ctx, job.decode_tokens, f"{ctx}-{i}-{uuid.uuid4().hex[:6]}")
            print(f"kvdemo.bench: {ctx} tokens, repeat {i}: " + ", ".join(
                f"{k}={rep[k]:.3f}" for k in job.cases.ttft_keys), flush=True)
            repeats.append(rep)
        job.cases.annotate(runtime, repeats)
        cases.append(job.cases.summarize(ctx, repeats))
    for i, ctx in enumerate(job.trace_contexts):
        assert trace_dir is not None
        label = f"trace-{ctx}" + (f"-{i}" if job.trace_contexts.count(ctx) > 1 else "")  # a context traced twice
        traces.append(await run_trace(runtime, ctx, f"trace-{ctx}-{uuid.uuid4().hex[:6]}", trace_dir, label=label))
        print(f"kvdemo.bench: traced a {ctx}-token blend: " + ", ".join(
            f"{k}={traces[-1][k]}" for k in TRACE_PRINT_KEYS), flush=True)
    return cases


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
    lines = engine_log_lines(runtime.lmcache_engine)
    found = []
    for pattern in EVIDENCE_PATTERNS:
        hits = [ln.strip()[:300] for ln in lines if pattern in ln]
        found += hits[:limit_per_pattern] + (hits[-1:] if len(hits) > limit_per_pattern else [])
    return found
