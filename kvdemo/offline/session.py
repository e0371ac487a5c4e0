"""The programmatic API: :class:`BlendSession`, an in-process vLLM ``LLM`` with the LMCache connector.

::

    from kvdemo.offline import BlendSession

    with BlendSession("mistralai/Mistral-7B-Instruct-v0.2", config="lmcache_configs/offline.yaml",
                      max_model_len=16384, enforce_eager=True) as session:
        chunks = [Path("data/chunks/01-data-model.txt"), "Some chunk given as text ..."]
        session.precompute(chunks, sys_prompt="You are a helpful assistant.")
        result = session.generate("You are a helpful assistant.", chunks, "What does the text say?")
        print(result.text, result.ttft_s)

vLLM and LMCache are imported only when a session starts, after the checks of :mod:`kvdemo.preflight`
and with the engine's environment set, so its engine-core process inherits it.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import preflight
from ..config import DEFAULT_MODEL, Settings
from ..errors import UserFacingError
from ..lmcache_config import LmcacheConfig
from ..prompts import load_tokenizer
from .prompts import ChunkLike, ChunkPrompts
from .settings import (
    DEFAULT_CONFIG,
    DEFAULT_MAX_TOKENS,
    TTFT_FROM_METRICS,
    TTFT_FROM_WALL_CLOCK,
    build_engine_kwargs,
    engine_env,
    ttft_from_output,
    with_skip_save,
)

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger("kvdemo.offline")


def require_gpu() -> list[preflight.Gpu]:
    """The GPUs nvidia-smi lists; a clear error when there are none (vLLM would fail obscurely later)."""
    return preflight.require_gpu("offline blending needs one, since vLLM and LMCache run in this process")


@dataclass(frozen=True)
class GenerateResult:
    """One request's answer and timing."""

    text: str
    ttft_s: float
    ttft_source: str  # TTFT_FROM_METRICS or TTFT_FROM_WALL_CLOCK
    prompt_tokens: int
    output_tokens: int
    total_s: float  # wall clock of the whole generate call
    finish_reason: str | None = None


@dataclass(frozen=True)
class PrecomputeResult:
    requests: int
    tokens: int
    seconds: float


class BlendSession:
    """An in-process vLLM engine with LMCache blending: precompute chunks, then ask blended questions.

    ``engine_kwargs`` go to ``vllm.LLM`` (e.g. ``max_model_len=16384, gpu_memory_utilization=0.8,
    load_format="dummy", enforce_eager=True``) on top of the blending settings of
    :func:`kvdemo.engines.lmcache_engine_kwargs`. The constructor starts the engine (a minute or two); use the session
    as a context manager, or call :meth:`close`, so the engine-core process ends with it.

    The process environment gets :func:`engine_env` while the session is open (restored by close()):
    the engine-core process vLLM starts inherits it, which is how the plugin and LMCache see it.
    """

    def __init__(self, model: str = DEFAULT_MODEL, config: str | os.PathLike | None = None, *,
                 sys_prompt: str | None = None, tokenizer: Any = None, prompts: ChunkPrompts | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, check_gpu: bool = True, **engine_kwargs: Any) -> None:
        self.model = model
        self.config_path = Path(config) if config is not None else DEFAULT_CONFIG
        self.lmcache_config = preflight.check_lmcache_config(self.config_path)
        if not self.lmcache_config.get("enable_blending"):
            log.warning("%s does not set enable_blending: true; LMCache will not blend", self.config_path)
        separator = LmcacheConfig.from_mapping(self.lmcache_config).separator
        if prompts is None:
            if tokenizer is None:
                tokenizer = load_tokenizer(Settings(model=model).tokenizer_source,
                                           token=os.environ.get("HF_TOKEN") or None)
            prompts = ChunkPrompts(tokenizer, sys_prompt or "", separator)
        elif prompts.separator != separator:
            raise UserFacingError(f"The prompts use the separator {prompts.separator!r} but "
                                  f"{self.config_path} sets blend_special_str {separator!r}: they must "
                                  "match.")
        elif sys_prompt is not None:
            prompts.library.sys_prompt = sys_prompt
        self.prompts = prompts
        self.default_max_tokens = max_tokens
        self.engine_kwargs = build_engine_kwargs(model, engine_kwargs)
        self.max_model_len: int | None = None
        self.startup_s: float | None = None
        self._llm: Any = None
        self._closed = False
        self._saved_env: dict[str, str | None] = {}
        if check_gpu:
            require_gpu()
        preflight.check_runtime_importable()
        preflight.check_plugin_installed()
        self._start()

    # -- life cycle ---------------------------------------------------------------------------------

    def _start(self) -> None:
        self._apply_env(engine_env(self.config_path, self.model))
        try:
            try:
                from vllm import LLM
                from vllm.config import KVTransferConfig
                from vllm.engine.arg_utils import EngineArgs
            except ImportError as exc:
                raise UserFacingError(f"Cannot import vLLM ({exc}): install requirements.txt on the GPU "
                                      "machine.") from exc
            kwargs = dict(self.engine_kwargs)
            unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(EngineArgs)})
            if unknown:
                flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
                raise UserFacingError(f"Unknown vLLM engine argument(s) {flags}: not fields of vLLM "
                                      f"{preflight.package_version('vllm') or ''} EngineArgs; check --engine-args.")
            if isinstance(kwargs.get("kv_transfer_config"), Mapping):
                kwargs["kv_transfer_config"] = KVTransferConfig(**kwargs["kv_transfer_config"])
            model = kwargs.pop("model")
            log.info("starting vLLM in-process with LMCache (config %s)", self.config_path)
            t0 = time.perf_counter()
            try:
                self._llm = LLM(model, **kwargs)
            except (ValueError, RuntimeError) as exc:  # config errors, CUDA OOM, engine-core start failure
                log.debug("engine start failed", exc_info=True)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise UserFacingError(f"vLLM could not start the engine for {model}: {first} (the engine's "
                                      "log lines above have the details).") from exc
            self.startup_s = time.perf_counter() - t0
            self.max_model_len = int(self._llm.llm_engine.model_config.max_model_len)
            log.info("engine ready in %.1f s (max_model_len %d)", self.startup_s, self.max_model_len)
        except BaseException:
            self._restore_env()
            raise

    def close(self) -> None:
        """Shut down LMCache and vLLM; safe to call twice.

        With vLLM's default multiprocessing the LMCache engine lives in vLLM's engine-core process and ends
        with it: ``engine_core.shutdown()`` terminates that process (kills it after a grace period). In
        in-process mode (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) LMCache lives here and is destroyed first,
        as LMCache's own example does.
        """
        if self._closed:
            return
        self._closed = True
        llm, self._llm = self._llm, None
        try:
            _destroy_lmcache_here()
            if llm is not None:
                core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
                shutdown = getattr(core, "shutdown", None)
                if callable(shutdown):
                    try:
                        shutdown()
                    except Exception as exc:  # noqa: BLE001 - shutting down must not raise over the result
                        log.warning("vLLM engine shutdown: %s: %s", type(exc).__name__, exc)
            del llm
            gc.collect()
        finally:
            self._restore_env()
        log.info("engine shut down")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _apply_env(self, env: Mapping[str, str]) -> None:
        for key, value in env.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def _restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` (for anything this class does not wrap)."""
        self._check_open()
        return self._llm

    def _check_open(self) -> None:
        if self._closed or self._llm is None:
            raise RuntimeError("this BlendSession is closed")

    # -- requests -----------------------------------------------------------------------------------

    def sampling_params(self, sampling: Any = None, *, skip_save: bool = False,
                        max_tokens: int | None = None) -> Any:
        """A copy of ``sampling`` (default: greedy, ``max_tokens`` of the session) with skip_save applied."""
        from vllm import SamplingParams

        params = sampling.clone() if sampling is not None else SamplingParams(
            temperature=0.0, max_tokens=self.default_max_tokens)
        if max_tokens is not None:
            params.max_tokens = max_tokens
        if skip_save:
            params.extra_args = with_skip_save(params.extra_args)
        return params

    def _run(self, ids: list[int], params: Any) -> Any:
        self._check_open()
        want = params.max_tokens if params.max_tokens is not None else 1
        if self.max_model_len is not None and len(ids) + max(1, want) > self.max_model_len:
            raise UserFacingError(f"The prompt is {len(ids)} tokens; with max tokens {want} it needs "
                                  f"{len(ids) + max(1, want)}, but the engine allows {self.max_model_len} "
                                  "(vLLM max_model_len). Use fewer or shorter chunks or fewer max tokens.")
        outputs = self._llm.generate({"prompt_token_ids": list(ids)}, params, use_tqdm=False)
        return outputs[0]

    def generate_ids(self, ids: Sequence[int], sampling: Any = None, *,
                     skip_save: bool = True) -> GenerateResult:
        """One request with a ready token-id prompt; TTFT from vLLM's metrics, else a timed 1-token run."""
        ids = list(ids)
        params = self.sampling_params(sampling, skip_save=skip_save)
        t0 = time.perf_counter()
        output = self._run(ids, params)
        total = time.perf_counter() - t0
        ttft, source = ttft_from_output(output), TTFT_FROM_METRICS
        if ttft is None:
            source = TTFT_FROM_WALL_CLOCK
            if params.max_tokens == 1:
                ttft = total
            else:  # same cache state: skip_save runs store nothing; a saving run re-stores the same KV
                t1 = time.perf_counter()
                self._run(ids, self.sampling_params(sampling, skip_save=skip_save, max_tokens=1))
                ttft = time.perf_counter() - t1
        completion = output.outputs[0]
        return GenerateResult(text=completion.text, ttft_s=ttft, ttft_source=source, prompt_tokens=len(ids),
                              output_tokens=len(completion.token_ids), total_s=total,
                              finish_reason=getattr(completion, "finish_reason", None))

    def generate(self, sys_prompt: str | None, chunks: Sequence[ChunkLike], question: str,
                 sampling: Any = None, *, skip_save: bool = True) -> GenerateResult:
        """Ask ``question`` over ``[BOS] + sys + SEP + c1 + ... + SEP + cN + SEP + question``.

        LMCache blends whatever of these segments it holds (see :meth:`precompute`); with nothing cached
        this is a full prefill. ``skip_save`` (default) keeps the question's KV out of the cache.
        ``sys_prompt=None`` uses the session's system prompt.
        """
        prompts = self.prompts.build(chunks, question, sys_prompt)
        return self.generate_ids(prompts.prompt, sampling, skip_save=skip_save)

    def precompute(self, chunks: Sequence[ChunkLike], sys_prompt: str | None = None) -> PrecomputeResult:
        """Store the KV of the system prompt and of each chunk, one 1-token request each, in order."""
        return self.precompute_ids(self.prompts.precompute(chunks, sys_prompt))

    def precompute_ids(self, requests: Sequence[Sequence[int]]) -> PrecomputeResult:
        params = self.sampling_params(max_tokens=1)
        t0 = time.perf_counter()
        for ids in requests:
            self._run(list(ids), params)
        seconds = time.perf_counter() - t0
        log.info("precomputed %d segments in %.2f s", len(requests), seconds)
        return PrecomputeResult(requests=len(requests), tokens=sum(len(r) for r in requests), seconds=seconds)

    def warm_up(self, chunk_tokens: int = 320) -> float:
        """Run both code paths once on a synthetic prompt, so no one-time warm-up lands in a measurement.

        A full prefill, a precompute and a blended request (chunks reordered), with their own system text,
        so nothing they store is a prefix of a real prompt (the real baseline stays a full prefill).
        """
        builder = self.prompts.builder
        encode = builder.tokenizer.encode
        sys_ids = list(encode("kvdemo warm-up: a system prompt that no real prompt starts with.",
                              add_special_tokens=False))
        question = list(encode("\n\nWarm-up question: what is this?", add_special_tokens=False))
        if self.max_model_len is not None:
            room = self.max_model_len - 16 - len(builder.bos_ids) - len(sys_ids) - len(question)
            chunk_tokens = min(chunk_tokens, room // 2 - len(builder.sep_ids))
        if chunk_tokens < 16:
            log.info("max_model_len too small for a warm-up; skipped")
            return 0.0
        words = " ".join(f"Warm-up sentence {i} of the kvdemo offline engine." for i in range(400))
        pool = list(encode(words, add_special_tokens=False))
        while len(pool) < 2 * chunk_tokens:
            pool += pool
        chunks = [pool[:chunk_tokens], pool[chunk_tokens:2 * chunk_tokens]]
        t0 = time.perf_counter()
        short = self.sampling_params(max_tokens=4)
        self.generate_ids(builder.assemble(sys_ids, chunks, question), short)
        self.precompute_ids(builder.precompute_layout(sys_ids, chunks))
        self.generate_ids(builder.assemble(sys_ids, chunks[::-1], question), short)
        seconds = time.perf_counter() - t0
        log.info("warm-up done in %.2f s", seconds)
        return seconds


def _destroy_lmcache_here() -> None:
    """``LMCacheEngineBuilder.destroy(ENGINE_NAME)`` when LMCache runs in this process.

    Only when LMCache is already imported here: with vLLM's engine-core process it is not, and importing it
    just to destroy nothing would load torch and LMCache's CUDA ops.
    """
    if "lmcache.v1.cache_engine" not in sys.modules:
        return
    try:
        from lmcache.integration.vllm.utils import ENGINE_NAME
        from lmcache.v1.cache_engine import LMCacheEngineBuilder

        LMCacheEngineBuilder.destroy(ENGINE_NAME)
    except Exception as exc:  # noqa: BLE001 - best effort at shutdown
        log.warning("LMCache engine destroy: %s: %s", type(exc).__name__, exc)
