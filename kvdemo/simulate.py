"""A simulated OpenAI-compatible engine, so the whole app runs and is tested without a GPU.

It is a real HTTP server (FastAPI + uvicorn) started as a subprocess by the same process manager as
`vllm serve`, with the endpoints the app uses: /health, /v1/models and streaming /v1/completions with
token-id prompts. TTFT is modelled from the number of tokens that must be computed:

- plain mode: vLLM-style prefix caching (blocks of 16 tokens, reuse only of an identical prefix);
- lmcache mode: LMCache-style blending (the prompt is split on the separator ids; every segment seen
  before is loaded and a fraction of it recomputed, in any order), with a store shared through a
  directory when `--store-dir` is given (as LMCache's fs connector shares between engines).

The constants are rough H100 / Mistral-7B figures (docs/benchmarks.md) so the demo looks plausible, but
every number that comes from here is SIMULATED and the app labels it so. Text is deterministic noise.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import os
import random
import time
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request  # resolved by FastAPI from this module's globals (string annotations)

BLOCK = 16  # vLLM's prefix-cache block size
SIM_KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # Mistral-7B's shape in bf16 (128 KiB), for SIMULATED bytes
WORDS = ["simulated", "lmcache", "kv", "cache", "token", "chunk", "blend", "prefix", "reuse", "engine", "answer", "python", "reference", "section", "model", "latency", "decode", "prefill", "layer", "attention", "store", "load"]
log = logging.getLogger("kvdemo.simulate")
TELEMETRY_ENV = "KVDEMO_TELEMETRY_DIR"  # set by kvdemo.engines.EngineProcess for LMCache engines


@dataclass
class CostModel:
    """Seconds per phase. `speed` > 1 shrinks every delay (tests), keeping the ratios."""

    base_s: float = 0.03
    prefill_s_per_token: float = 30e-6  # ~0.49 s for 16K uncached tokens
    blend_overhead_s: float = 0.08  # LMCache's per-request blending floor
    recompute_ratio: float = 0.15  # share of reused tokens recomputed when blending
    load_s_per_token: float = 2.5e-6  # KV transfer of reused tokens from CPU memory
    shared_load_s_per_token: float = 12e-6  # from a shared file store (about 16K in 0.2 s)
    decode_tok_s: float = 60.0
    speed: float = 1.0

    def scaled(self, seconds: float) -> float:
        return seconds / self.speed


@dataclass
class SegmentStore:
    """Which KV segments are stored: in memory, or shared between engines through a directory or Redis.

    In Redis the entries take LMCache's own key form (`model@world@worker@hash@dtype` + "metadata" /
    "kv_bytes", as its Redis connector writes them), so kvdemo's KvStore sizes and clears them the same way;
    the simulated "kv_bytes" hold one byte per token, not the real KV size.
    """

    directory: Path | None = None
    redis_url: str | None = None
    model: str = "simulated"
    known: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._redis = None
        if self.redis_url:
            import redis  # lazy: only a simulated engine on a Redis store needs it

            self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=3)

    @property
    def shared(self) -> bool:
        return self.directory is not None or self._redis is not None

    def _redis_key(self, key: str) -> str:
        return f"{self.model}@1@0@{key}@simulated"

    def __contains__(self, key: str) -> bool:
        if key in self.known:
            return True
        if self._redis is not None:
            return bool(self._redis.exists(self._redis_key(key) + "metadata"))
        return self.directory is not None and (self.directory / key).exists()

    def add(self, key: str, n_tokens: int) -> None:
        self.known.add(key)
        if self._redis is not None:
            base = self._redis_key(key)
            self._redis.set(base + "kv_bytes", b"\0" * n_tokens)
            self._redis.set(base + "metadata", str(n_tokens))
        elif self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Size as real KV would take (128 KiB per token for Mistral-7B), kept sparse on disk.
            path = self.directory / key
            with open(path, "wb") as f:
                f.truncate(n_tokens * 128 * 1024)


def _hash(ids: list[int] | tuple[int, ...], prev: str = "") -> str:
    return hashlib.sha1(prev.encode() + array("q", ids).tobytes()).hexdigest()[:20]


def prefix_block_hashes(ids: list[int], block: int = BLOCK) -> list[str]:
    """Chained hashes of full blocks, as vLLM's prefix cache (16) and LMCache's chunks (256) key them."""
    hashes, prev = [], ""
    for end in range(block, len(ids) + 1, block):
        prev = _hash(ids[end - block:end], prev)
        hashes.append(prev)
    return hashes


def split_segments(ids: list[int], sep: list[int]) -> list[list[int]]:
    """Split on every occurrence of sep (as LMCache's SegmentTokenDatabase does)."""
    if not sep:
        return [ids]
    out, start, i, n = [], 0, 0, len(sep)
    while i <= len(ids) - n:
        if ids[i:i + n] == sep:
            out.append(ids[start:i])
            i += n
            start = i
        else:
            i += 1
    out.append(ids[start:])
    return out


class SimulatedEngine:
    """The cache state and timing model of one engine."""

    def __init__(self, mode: str, sep_ids: list[int], costs: CostModel, store: SegmentStore,
                 max_model_len: int, blending: bool = True, chunk_size: int = 256,
                 min_retrieve_tokens: int = 0) -> None:
        self.mode = mode
        self.blending = blending
        self.chunk_size = chunk_size
        self.min_retrieve_tokens = min_retrieve_tokens
        self.sep_ids = sep_ids
        self.costs = costs
        self.store = store
        self.max_model_len = max_model_len
        self.prefix_blocks: set[str] = set()

    @property
    def blend_noise(self) -> float:
        """How far a blended answer's simulated log-probs drift: none when every token is recomputed."""
        return 0.3 * (1.0 - self.costs.recompute_ratio) if self.mode == "lmcache" and self.blending else 0.0

    def prefill_seconds(self, ids: list[int], save: bool) -> tuple[float, int]:
        """Simulated prefill time and how many prompt tokens were reused from cache."""
        c = self.costs
        if self.mode == "plain":
            reused = 0
            hashes = prefix_block_hashes(ids)
            for h in hashes:
                if h not in self.prefix_blocks:
                    break
                reused += BLOCK
            reused = min(reused, len(ids) - 1)  # the last token is always computed
            self.prefix_blocks.update(hashes)
            return c.base_s + (len(ids) - reused) * c.prefill_s_per_token, reused
        if not self.blending:
            return self._prefix_chunk_prefill(ids, save)
        segments = split_segments(ids, self.sep_ids)
        reused = 0
        for seg in segments:  # LMCache's lookup is a prefix match over segments
            if seg and _hash(seg) in self.store:
                reused += len(seg)
            else:
                break
        if save:
            for seg in segments:
                if seg:
                    self.store.add(_hash(seg), len(seg))
        if 0 < reused < self.min_retrieve_tokens:  # as LMCache: a short hit is prefilled, not blended
            log.info("LMCache hit tokens: %d, but need to load: %d < min_retrieve %d, skip retrieve (SIMULATED)",
                     reused, reused, self.min_retrieve_tokens)
            reused = 0
        else:
            log.info("LMCache hit tokens: %d, need to load: %d (SIMULATED)", reused, reused)
        computed = len(ids) - reused
        seconds = c.base_s + computed * c.prefill_s_per_token
        if reused:
            seconds += c.blend_overhead_s + reused * (c.recompute_ratio * c.prefill_s_per_token + c.load_s_per_token)
        return seconds, reused

    def record_load(self, request_id: str, prompt_tokens: int, reused: int) -> None:
        """Write the per-request line a real LMCache engine's plugin writes (kvdemo.telemetry reads it)."""
        directory = os.environ.get(TELEMETRY_ENV)
        if not directory:
            return
        from .lmcache_patches.telemetry import write_record

        c = self.costs
        blended = self.blending
        per_token = (c.recompute_ratio * c.prefill_s_per_token + c.load_s_per_token) if blended else (
            c.shared_load_s_per_token if self.store.shared else c.load_s_per_token)
        Path(directory).mkdir(parents=True, exist_ok=True)
        write_record(Path(directory), {
            "req_id": f"cmpl-{request_id}-0-sim", "simulated": True, "mode": "blend" if blended else "retrieve",
            "prompt_tokens": prompt_tokens, "lmcache_hit_tokens": reused, "vllm_prefix_tokens": 0,
            "loaded_tokens": reused, "kv_bytes_loaded": reused * SIM_KV_BYTES_PER_TOKEN,
            "recomputed_tokens": max(1, int(reused * c.recompute_ratio)) if blended else None,
            "blend_tokens": reused if blended else None, "load_gpu_ms": round(reused * per_token * 1e3, 3),
            "load_host_ms": None, "gc_pause_ms": None, "exact_mask_layers": 0, "mask_fallback_layers": 0,
            "requests_in_step": 1, "time": time.time()})

    def _prefix_chunk_prefill(self, ids: list[int], save: bool) -> tuple[float, int]:
        """LMCache without blending: reuse of the longest stored prefix of chunk_size-token chunks."""
        c = self.costs
        hashes = prefix_block_hashes(ids, self.chunk_size)
        reused = 0
        for h in hashes:
            if h not in self.store:
                break
            reused += self.chunk_size
        reused = min(reused, len(ids) - 1)
        if save:
            for h in hashes:
                if h not in self.store:
                    self.store.add(h, self.chunk_size)
        per_token = c.shared_load_s_per_token if self.store.shared else c.load_s_per_token
        log.info("LMCache hit tokens: %d, need to load: %d (SIMULATED)", reused, reused)
        if reused:
            log.info("Retrieved %d tokens from the %s store in %.1f ms (SIMULATED)", reused,
                     "shared" if self.store.shared else "local", reused * per_token * 1e3)
        return c.base_s + (len(ids) - reused) * c.prefill_s_per_token + reused * per_token, reused


def build_app(engine: SimulatedEngine, model_name: str):
    """FastAPI app with the OpenAI-compatible subset the demo uses."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="kvdemo simulated engine (SIMULATED)")
    lock = asyncio.Lock()  # one prefill at a time, like one GPU

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> dict:
        """vLLM's dev-mode endpoint (the quality benchmark's cold references): forget the prefix cache."""
        engine.prefix_blocks.clear()
        return {}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "kvdemo-simulated",
                                            "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: dict, request: Request):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            return _error("kvdemo's simulated engine takes token-id prompts (a list of ints).")
        max_tokens = int(body.get("max_tokens") or 16)
        if len(prompt) + max_tokens > engine.max_model_len:
            return _error(f"This model's maximum context length is {engine.max_model_len} tokens. However, you "
                          f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the messages, "
                          f"{max_tokens} in the completion).")
        params = body.get("kv_transfer_params") or {}
        save = not params.get("lmcache.skip_save", False)
        start = time.perf_counter()
        async with lock:
            prefill_s, reused = engine.prefill_seconds(prompt, save)
            await asyncio.sleep(engine.costs.scaled(prefill_s))
        words = _answer_words(prompt, max_tokens, body.get("ignore_eos", False))
        created = int(time.time())
        rid = f"cmpl-sim-{_hash(prompt)[:8]}-{created}"
        if reused and engine.mode == "lmcache":
            engine.record_load(request.headers.get("x-request-id") or rid, len(prompt), reused)

        def chunk(text: str, finish: str | None = None, usage: dict | None = None) -> dict:
            choices = [] if usage else [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices, "usage": usage}

        if body.get("logprobs") is not None:  # the quality benchmark's scored, non-streamed answers
            scored = simulated_logprobs(prompt, max_tokens, int(body["logprobs"]),
                                        blend_noise=engine.blend_noise if reused else 0.0)
            usage = {"prompt_tokens": len(prompt), "completion_tokens": max_tokens,
                     "total_tokens": len(prompt) + max_tokens, "prompt_tokens_details": {"cached_tokens": reused}}
            return {**chunk("".join(words), "length"), "choices": [
                {"index": 0, "text": "[SIMULATED]", "finish_reason": "length", "logprobs": scored}], "usage": usage}
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(words),
                 "total_tokens": len(prompt) + len(words),
                 "prompt_tokens_details": {"cached_tokens": reused}}
        if not body.get("stream"):
            await asyncio.sleep(engine.costs.scaled(len(words) / engine.costs.decode_tok_s))
            return {**chunk("".join(words), "length"), "usage": usage}

        async def events() -> AsyncIterator[str]:
            sent = 0
            try:
                for i, word in enumerate(words):
                    if i:
                        await asyncio.sleep(engine.costs.scaled(1 / engine.costs.decode_tok_s))
                    last = i == len(words) - 1
                    yield f"data: {json.dumps(chunk(word, 'length' if last else None))}\n\n"
                    sent = i + 1
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield f"data: {json.dumps(chunk('', usage=usage))}\n\n"
                yield "data: [DONE]\n\n"
            except (asyncio.CancelledError, GeneratorExit):  # the client closed the stream: vLLM aborts then
                log.info("request %s: client disconnected after %d of %d tokens, aborted (SIMULATED)",
                         rid, sent, len(words))
                raise
            log.info("request %s: %d prompt tokens, %d reused, %.3f s to first token (SIMULATED)",
                     rid, len(prompt), reused, time.perf_counter() - start)

        return StreamingResponse(events(), media_type="text/event-stream")

    def _error(message: str):
        return JSONResponse(status_code=400, content={"object": "error", "message": message,
                                                      "type": "BadRequestError", "code": 400})

    return app


def _answer_words(prompt: list[int], max_tokens: int, ignore_eos: bool) -> list[str]:
    """Deterministic filler text, one word per token, labelled as simulated."""
    rng = random.Random(_hash(prompt))
    n = max_tokens if ignore_eos else min(max_tokens, rng.randint(24, 64))
    words = ["[SIMULATED]"] + [rng.choice(WORDS) for _ in range(n - 1)]
    return [(" " if i else "") + w for i, w in enumerate(words[:n])]


def simulated_logprobs(prompt: list[int], n_tokens: int, top_k: int, blend_noise: float = 0.0) -> dict:
    """Deterministic top-k log-probs per generated token, as vLLM returns them with token ids.

    Each step's distribution depends on the prompt and the tokens so far; a blended prompt perturbs it by
    ``blend_noise`` (more for a lower recompute ratio), so the quality benchmark's plumbing sees a
    difference where a real blend would make one. Every number is SIMULATED.
    """
    tokens, top = [], []
    context = list(prompt)
    for _ in range(n_tokens):
        rng = random.Random(_hash(context[-64:] + [len(context)]))
        ids = rng.sample(range(1000, 30000), top_k)
        logits = sorted((rng.gauss(0, 2.0) for _ in ids), reverse=True)
        if blend_noise:
            noise = random.Random(_hash(context[-64:]) + "blend")
            logits = [x + noise.gauss(0, blend_noise) for x in logits]
        norm = math.log(sum(math.exp(x) for x in logits) + 1.0)  # +1: mass outside the top-k
        entry = {f"token_id:{t}": x - norm for t, x in zip(ids, logits)}
        best = max(entry, key=entry.__getitem__)
        tokens.append(best)
        top.append(entry)
        context.append(int(best.split(":")[1]))
    return {"tokens": tokens, "token_logprobs": [e[t] for t, e in zip(tokens, top)], "top_logprobs": top,
            "text_offset": list(range(n_tokens))}


def lmcache_settings(model: str, config_path: Path | None) -> dict:
    """What the simulator takes from an LMCache yaml (kvdemo.lmcache_config): separator ids (as LMCache
    computes them: encode, drop the first id), whether blending is on, the chunk size, the recompute ratio,
    the shortest hit that is loaded."""
    from .lmcache_config import LmcacheConfig
    from .prompts import load_tokenizer

    config = LmcacheConfig.load(config_path) if config_path and config_path.is_file() else LmcacheConfig()
    return {"sep_ids": list(load_tokenizer(model).encode(config.separator))[1:], "blending": config.blending,
            "chunk_size": config.chunk_size, "recompute_ratio": config.recompute_ratio,
            "min_retrieve_tokens": config.min_retrieve_tokens}


def main() -> None:
    from .config import DEFAULT_MODEL, SIM_TOKENIZER_DIR

    ap = argparse.ArgumentParser(description="kvdemo simulated OpenAI-compatible engine (SIMULATED timings)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--mode", choices=["lmcache", "plain"], required=True)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--lmcache-config", type=Path)
    ap.add_argument("--store-dir", type=Path, help="share stored segments with other engines through here")
    ap.add_argument("--store-url", help="redis://host:port: share stored segments through this Redis server")
    ap.add_argument("--speed", type=float, default=1.0, help="divide every simulated delay by this")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokenizer_source = str(SIM_TOKENIZER_DIR) if a.model == DEFAULT_MODEL else a.model
    lmc = lmcache_settings(tokenizer_source, a.lmcache_config)
    engine = SimulatedEngine(a.mode, lmc["sep_ids"], CostModel(speed=a.speed, recompute_ratio=lmc["recompute_ratio"]),
                             SegmentStore(a.store_dir, a.store_url, a.model),
                             a.max_model_len, blending=lmc["blending"], chunk_size=lmc["chunk_size"],
                             min_retrieve_tokens=lmc["min_retrieve_tokens"])
    log.info("SIMULATED %s engine for %s on port %d", a.mode, a.model, a.port)
    import uvicorn

    uvicorn.run(build_app(engine, a.model), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
