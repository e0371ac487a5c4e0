"""LMCache KV blending in a script, without a server: vLLM's in-process ``LLM`` with the LMCache connector.

The offline counterpart of LMCache's ``examples/blend_kv_v1/blend.py``, built on the same pieces as the
app's server path, so both blend the same way:

* prompts are token ids assembled by :class:`kvdemo.prompts.PromptBuilder` (``assemble`` /
  ``precompute_layout``): ``[BOS] + sys + SEP + c1 + ... + SEP + cN + SEP + question``, every piece
  tokenized on its own, so each chunk's KV is found again wherever the chunk sits;
* the engine gets the LMCache engine's settings of :mod:`kvdemo.engines` (``LMCACHE_KV_TRANSFER``,
  ``BASE_ENGINE_ENV``, no prefix caching, FlashAttention) and ``KVDEMO_LMCACHE_PLUGIN=1``, which switches
  on :mod:`kvdemo.vllm_plugin` (model registration with LMCache's blender, Mistral mapping, LMCache
  fixes). vLLM loads that plugin through the ``kvdemo_lmcache`` entry point in every process it starts,
  so the project must be pip-installed (``pip install -e .``).

API::

    from kvdemo.offline import BlendSession

    with BlendSession("mistralai/Mistral-7B-Instruct-v0.2", config="lmcache_configs/offline.yaml",
                      max_model_len=16384, enforce_eager=True) as session:
        chunks = [Path("data/chunks/01-data-model.txt"), "Some chunk given as text ..."]
        session.precompute(chunks, sys_prompt="You are a helpful assistant.")
        result = session.generate("You are a helpful assistant.", chunks, "What does the text say?")
        print(result.text, result.ttft_s)

CLI (prints the answer, the TTFT of a full-prefill baseline and of the blended run, and the speedup)::

    python -m kvdemo.offline --model M --chunks data/chunks/a.txt data/chunks/b.txt --question "..." \
        [--config lmcache_configs/offline.yaml] [--engine-args "--load-format dummy --enforce-eager"] [--json]

Run protocol of the CLI: start the engine → warm-up (its own synthetic prompt: a full prefill, a
precompute and a blended request, so CUDA/JIT warm-up of both paths is not measured) → the prompt
``--repeats`` times before anything of it is cached (full prefill; ``lmcache.skip_save`` so nothing is
stored) → precompute ``[BOS]+sys`` and ``[BOS]+SEP+ci`` → the same prompt ``--repeats`` times, blended
(also ``skip_save``, so every repeat blends the same cached chunks) → shut down.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata, util
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .. import preflight
from ..config import DEFAULT_MODEL, REPO_ROOT, Settings
from ..engines import BASE_ENGINE_ENV, LMCACHE_KV_TRANSFER
from ..errors import UserFacingError
from ..lmcache_config import LmcacheConfig
from ..prompts import DEFAULT_SEPARATOR, Chunk, ChunkLibrary, PromptBuilder, load_tokenizer, read_chunk
from ..vllm_plugin import ENV_ENABLE as PLUGIN_ENV

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

PROG = "kvdemo.offline"
DEFAULT_CONFIG = REPO_ROOT / "lmcache_configs" / "offline.yaml"
DEFAULT_SYS_PROMPT_FILE = REPO_ROOT / "data" / "sys_prompt.txt"
DEFAULT_MAX_TOKENS = 128
DEFAULT_REPEATS = 3

# The plugin vLLM must load in its engine processes (pyproject.toml's entry point).
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "kvdemo_lmcache"
PLUGIN_TARGET = "kvdemo.vllm_plugin:register"
VERIFIED_VERSIONS = {"vllm": "0.22.0", "lmcache": "0.5.3"}  # the pair GPU.md verified blending with

# Engine settings LMCache blending needs (the server's LMCache engine: engines.EngineSpec.argv).
BLENDING_ENGINE_KWARGS: dict[str, Any] = {
    "kv_transfer_config": dict(LMCACHE_KV_TRANSFER),
    "enable_prefix_caching": False,  # vLLM's own prefix cache would answer before LMCache is asked
    "attention_backend": "FLASH_ATTN",  # LMCache's blender supports FlashAttention only
}
SKIP_SAVE = "lmcache.skip_save"

TTFT_FROM_METRICS = "vllm RequestOutput.metrics.first_token_latency (request arrival -> first token)"
TTFT_FROM_WALL_CLOCK = "wall clock of LLM.generate(max_tokens=1)"

ChunkLike = str | os.PathLike | Chunk


# --------------------------------------------------------------------------------------------------
# Pure helpers: engine arguments, environment, checks (no vLLM, no GPU)
# --------------------------------------------------------------------------------------------------


def parse_engine_args(text: str | Sequence[str] | None) -> dict[str, Any]:
    """``--engine-args`` (the app's ``vllm serve`` pass-through) → keyword arguments for ``vllm.LLM``.

    The app passes these flags to ``vllm serve``; offline they become ``LLM(**kwargs)`` (vLLM's
    ``EngineArgs`` fields), so one string works for both. The mapping:

    * ``--name value`` and ``--name=value`` → ``name=value`` (dashes become underscores); the value is
      decoded as JSON when it parses (``4`` → 4, ``0.5`` → 0.5, ``true`` → True, ``{"a": 1}`` → dict),
      otherwise kept as a string (``dummy``);
    * ``--name`` with no value (end, or the next token is a flag) → ``name=True``;
    * ``--no-name`` with no value → ``name=False`` (vLLM's ``--no-enable-prefix-caching``).

    Short flags (``-tp 2``) and positional words are refused: say ``--tensor-parallel-size 2``.
    """
    tokens = shlex.split(text) if isinstance(text, str) else list(text or [])
    kwargs: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise UserFacingError(f"--engine-args: expected a --flag, got {token!r} (use long flags, e.g. "
                                  '"--load-format dummy --enforce-eager").')
        name, eq, value = token[2:].partition("=")
        if eq:
            kwargs[_kwarg_name(name)] = _decode_value(name, value)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            kwargs[_kwarg_name(name)] = _decode_value(name, tokens[i + 1])
            i += 2
        else:
            if name.startswith("no-"):
                kwargs[_kwarg_name(name[3:])] = False
            else:
                kwargs[_kwarg_name(name)] = True
            i += 1
    return kwargs


def _kwarg_name(flag: str) -> str:
    if not flag or not all(c.isalnum() or c in "-_" for c in flag):
        raise UserFacingError(f"--engine-args: {('--' + flag)!r} is not a valid flag name.")
    return flag.replace("-", "_")


def _decode_value(flag: str, value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        if value.lstrip().startswith(("{", "[")):
            raise UserFacingError(f"--engine-args: the value of --{flag} looks like JSON but does not parse: "
                                  f"{value!r}.") from None
        return value


def build_engine_kwargs(model: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``: the LMCache engine's settings, then the caller's ``extra``.

    ``extra`` may override the blending settings (a warning says blending may then not work) but never
    ``model``. ``disable_log_stats=False`` makes vLLM fill ``RequestOutput.metrics`` (the TTFT source).
    """
    extra = dict(extra or {})
    if "model" in extra:
        raise UserFacingError("--engine-args must not set the model: use --model.")
    kwargs: dict[str, Any] = {"model": model, **BLENDING_ENGINE_KWARGS, "disable_log_stats": False}
    if "attention_config" in extra:
        kwargs.pop("attention_backend")  # vLLM refuses both at once
    for key, value in extra.items():
        if key in BLENDING_ENGINE_KWARGS and value != BLENDING_ENGINE_KWARGS[key]:
            log.warning("engine argument %s=%r overrides %r, which LMCache blending needs; "
                        "blending may not work", key, value, BLENDING_ENGINE_KWARGS[key])
        if key == "disable_log_stats" and value:
            log.warning("disable_log_stats=True: vLLM fills no request metrics; TTFT falls back to %s",
                        TTFT_FROM_WALL_CLOCK)
        kwargs[key] = value
    return kwargs


def engine_env(config: Path, model: str) -> dict[str, str]:
    """Environment the engine needs, set before vLLM is imported so its engine-core process inherits it.

    The same variables the app gives its LMCache engine (engines.EngineSpec.env): the plugin switch,
    LMCache's config file, no flashinfer sampler JIT, stable hashes, no telemetry, and offline Hub access
    for a local model directory.
    """
    env = dict(BASE_ENGINE_ENV)
    env[PLUGIN_ENV] = "1"
    env["LMCACHE_CONFIG_FILE"] = str(Path(config).expanduser().resolve())
    if Settings(model=model).is_local_model:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def require_gpu() -> list[preflight.Gpu]:
    """The GPUs nvidia-smi lists; a clear error when there are none (vLLM would fail obscurely later)."""
    gpus = preflight.detect_gpus()
    if not gpus:
        raise UserFacingError("No NVIDIA GPU found (nvidia-smi lists none): offline blending needs one, "
                              "since vLLM and LMCache run in this process. Try `python app.py --simulate` "
                              "for a GPU-free demo.")
    return gpus


def plugin_problem() -> str | None:
    """Why vLLM would not load kvdemo's plugin (then LMCache cannot blend), or None when it will."""
    try:
        eps = list(metadata.entry_points(group=PLUGIN_GROUP))
    except Exception as exc:  # noqa: BLE001 - a broken metadata install must not crash the check
        return f"cannot list vLLM plugins ({type(exc).__name__}: {exc})"
    ep = next((e for e in eps if e.name == PLUGIN_NAME), None)
    if ep is None:
        return (f"kvdemo's vLLM plugin is not installed (entry point {PLUGIN_NAME} in group {PLUGIN_GROUP}), "
                "so LMCache cannot blend: run `pip install -e .` in the kvdemo checkout.")
    if ep.value != PLUGIN_TARGET:
        return (f"the installed entry point {PLUGIN_NAME} points at {ep.value}, not {PLUGIN_TARGET}: "
                "reinstall kvdemo with `pip install -e .`.")
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in [p.strip() for p in allowed.split(",")]:
        return f"VLLM_PLUGINS={allowed!r} leaves out {PLUGIN_NAME}: add it, or unset VLLM_PLUGINS."
    return None


def check_plugin_installed() -> None:
    problem = plugin_problem()
    if problem:
        raise UserFacingError(problem[0].upper() + problem[1:])


def check_runtime_importable() -> None:
    """vLLM and LMCache are installed (without importing them: that takes seconds and loads CUDA)."""
    for name in ("vllm", "lmcache"):
        if not _module_available(name):
            raise UserFacingError(f"{name} is not installed in this Python: offline blending needs vllm "
                                  f"{VERIFIED_VERSIONS['vllm']} + lmcache {VERIFIED_VERSIONS['lmcache']} "
                                  "(pip install -r requirements.txt on the GPU machine).")
    for name, verified in VERIFIED_VERSIONS.items():
        version = package_version(name)
        if version is not None and version != verified:
            log.warning("%s %s is installed; blending was verified with vllm %s + lmcache %s", name, version,
                        VERIFIED_VERSIONS["vllm"], VERIFIED_VERSIONS["lmcache"])


def _module_available(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def model_context_limit(model: str) -> int | None:
    """The model's own context length (config.json), to refuse too-long prompts before the engine starts.

    None when unknown (e.g. the Hub is unreachable): the engine's ``max_model_len`` is checked after start.
    """
    settings = Settings(model=model, hf_token=os.environ.get("HF_TOKEN") or None)
    config: Mapping[str, Any] = {}
    try:
        if settings.is_local_model:
            config = json.loads((Path(model).expanduser() / "config.json").read_text())
        else:
            from transformers import AutoConfig  # lazy: importing transformers takes seconds

            config = AutoConfig.from_pretrained(model, token=settings.hf_token).to_dict()
    except Exception as exc:  # noqa: BLE001 - only an early check; vLLM checks again
        log.debug("cannot read the context length of %s: %s", model, exc)
        return None
    for source in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def with_skip_save(extra_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """``SamplingParams.extra_args`` with ``kv_transfer_params["lmcache.skip_save"] = True``.

    vLLM 0.22 hands ``extra_args["kv_transfer_params"]`` to the KV connector (``vllm/v1/request.py``) and
    LMCache reads its ``lmcache.*`` keys as per-request settings (``extract_request_configs`` in
    ``lmcache/integration/vllm/vllm_v1_adapter.py``) — the offline form of the completions API's
    ``"kv_transfer_params": {"lmcache.skip_save": true}``. A question is never worth storing, and an
    unsaved baseline stays a full prefill on every repeat.
    """
    extra = dict(extra_args or {})
    params = dict(extra.get("kv_transfer_params") or {})
    params[SKIP_SAVE] = True
    extra["kv_transfer_params"] = params
    return extra


def ttft_from_output(output: Any) -> float | None:
    """TTFT of one vLLM ``RequestOutput`` from its V1 metrics (``RequestStateStats.first_token_latency``).

    vLLM 0.22 sets it (``vllm/v1/metrics/stats.py``, ``IterationStats.update_from_output``) as the time from
    the request's arrival to the output step that carried its first token, in this process — what a
    client measures, minus HTTP. Metrics exist only when stats are on (``disable_log_stats=False``).
    """
    metrics = getattr(output, "metrics", None)
    value = getattr(metrics, "first_token_latency", None)
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    return None


# --------------------------------------------------------------------------------------------------
# Prompts: chunk files/texts → token ids through kvdemo.prompts.PromptBuilder
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlendPrompts:
    """The token ids of one blended question and of the precompute requests that cache its pieces."""

    chunk_names: list[str]
    sys_ids: list[int]  # the system-prompt segment without BOS (chat prefix included)
    chunk_ids: list[list[int]]
    question_ids: list[int]
    prompt: list[int]  # [BOS] + sys + SEP + c1 + ... + SEP + cN + SEP + question
    precompute: list[list[int]]  # [BOS] + sys, then [BOS] + SEP + ci per chunk
    bos_tokens: int
    sep_tokens: int

    @property
    def total(self) -> int:
        return len(self.prompt)

    def breakdown(self) -> dict[str, Any]:
        """Token counts of each piece; they add up to ``total``."""
        return {"total": self.total, "bos": self.bos_tokens, "system": len(self.sys_ids),
                "chunks": [len(c) for c in self.chunk_ids],
                "separators": self.sep_tokens * (len(self.chunk_ids) + 1), "question": len(self.question_ids)}

    def describe(self) -> str:
        b = self.breakdown()
        return (f"{b['total']} tokens: system {b['system']}, {len(b['chunks'])} chunk(s) {sum(b['chunks'])}, "
                f"separators {b['separators']}, question {b['question']}, BOS {b['bos']}")


def load_chunk_file(path: str | os.PathLike) -> Chunk:
    """One chunk file (kvdemo.prompts.read_chunk: empty or non-UTF-8 files are refused)."""
    path = Path(path)
    if not path.exists():
        raise UserFacingError(f"Chunk file {path} does not exist: check the paths given to --chunks.")
    if path.is_dir():
        raise UserFacingError(f"{path} is a directory: --chunks takes files, e.g. {path}/*.txt.")
    return read_chunk(path)


def read_sys_prompt(path: str | os.PathLike) -> str:
    """The system prompt file's text; missing, empty or non-UTF-8 files are refused."""
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"System prompt file {path} does not exist: fix --sys-prompt-file.")
    try:
        return read_chunk(path).text
    except UserFacingError as exc:
        raise UserFacingError(f"--sys-prompt-file: {exc}") from exc


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def _text_chunk(text: str, index: int) -> Chunk:
    body = text.strip()
    if not body:
        raise UserFacingError(f"Chunk {index + 1} is empty text: give it some text or leave it out.")
    if "\n" not in body and len(body) < 4096 and _is_file(body):
        log.warning("chunk %d is a str that names an existing file; it is used as TEXT (pass a Path to read "
                    "the file)", index + 1)
    first, _, _ = body.partition("\n")
    digest = hashlib.sha1(body.encode()).hexdigest()[:10]
    return Chunk(name=f"text-{digest}", title=first.lstrip("#").strip()[:80] or f"text-{digest}", text=body)


class ChunkPrompts:
    """Token-id prompts for offline blending, assembled by the server path's PromptBuilder.

    Chunks (files, texts or :class:`~kvdemo.prompts.Chunk`) go into one ChunkLibrary so that
    ``PromptBuilder.chunk_ids`` tokenizes each once; two different chunks with the same file stem get
    distinct names. The separator must be LMCache's ``blend_special_str``.
    """

    def __init__(self, tokenizer: Any, sys_prompt: str = "", separator: str = DEFAULT_SEPARATOR) -> None:
        self.library = ChunkLibrary(sys_prompt=sys_prompt, chunks={})
        self.builder = PromptBuilder(tokenizer, self.library, separator)

    @property
    def separator(self) -> str:
        return self.builder.separator

    def add(self, chunks: Sequence[ChunkLike]) -> list[str]:
        """Put chunks into the library; returns their names, in the order given."""
        if isinstance(chunks, (str, os.PathLike, Chunk)):
            raise TypeError("chunks must be a sequence (texts, paths or Chunk objects), not one chunk")
        names = []
        for i, item in enumerate(chunks):
            if isinstance(item, Chunk):
                chunk = item
            elif isinstance(item, os.PathLike):
                chunk = load_chunk_file(item)
            elif isinstance(item, str):
                chunk = _text_chunk(item, i)
            else:
                raise TypeError(f"chunk {i + 1}: expected str (text), a path or a Chunk, "
                                f"got {type(item).__name__}")
            existing = self.library.chunks.get(chunk.name)
            if existing is not None and existing.text != chunk.text:
                digest = hashlib.sha1(chunk.text.encode()).hexdigest()[:8]
                chunk = dataclasses.replace(chunk, name=f"{chunk.name}-{digest}")
            self.library.chunks[chunk.name] = chunk
            names.append(chunk.name)
        return names

    def _sys_ids(self, sys_prompt: str | None) -> list[int]:
        text = self.library.sys_prompt if sys_prompt is None else sys_prompt
        if not text.strip():
            raise UserFacingError("The system prompt is empty: LMCache matches a blended prompt from its "
                                  "system segment on, so give one (--sys-prompt-file, or sys_prompt=...).")
        return self.builder.sys_ids(text.strip())

    def precompute(self, chunks: Sequence[ChunkLike], sys_prompt: str | None = None) -> list[list[int]]:
        """``[BOS] + sys``, then ``[BOS] + SEP + ci`` per chunk: each request stores one segment's KV."""
        names = self.add(chunks)
        chunk_ids = [self.builder.chunk_ids(n) for n in names]
        return self.builder.precompute_layout(self._sys_ids(sys_prompt), chunk_ids)

    def build(self, chunks: Sequence[ChunkLike], question: str,
              sys_prompt: str | None = None) -> BlendPrompts:
        """The blended prompt and its precompute requests, from the same tokenized pieces."""
        if not question or not question.strip():
            raise UserFacingError("The question is empty: give --question some text.")
        if not chunks:
            raise UserFacingError("No chunks given: blending needs at least one chunk (--chunks FILE ...).")
        names = self.add(chunks)
        sys_ids = self._sys_ids(sys_prompt)
        chunk_ids = [self.builder.chunk_ids(n) for n in names]
        question_ids = self.builder.question_ids(question)
        return BlendPrompts(
            chunk_names=names, sys_ids=sys_ids, chunk_ids=chunk_ids, question_ids=question_ids,
            prompt=self.builder.assemble(sys_ids, chunk_ids, question_ids),
            precompute=self.builder.precompute_layout(sys_ids, chunk_ids),
            bos_tokens=len(self.builder.bos_ids), sep_tokens=len(self.builder.sep_ids),
        )


def check_fits(prompts: BlendPrompts, max_tokens: int, limit: int | None,
               limit_source: str = "max_model_len") -> None:
    """Refuse a prompt the model cannot take (vLLM needs prompt + at least 1 token <= max_model_len)."""
    if limit is None:
        return
    needed = prompts.total + max(1, max_tokens)
    if needed > limit:
        raise UserFacingError(
            f"The prompt is too long for the model: {prompts.describe()}; with max tokens {max_tokens} it "
            f"needs {needed} tokens, but the model allows {limit} ({limit_source}). Use fewer or shorter "
            "chunks, fewer --max-tokens, or a larger --max-model-len if the model supports it.")


# --------------------------------------------------------------------------------------------------
# The session: vLLM LLM + LMCache connector
# --------------------------------------------------------------------------------------------------


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
    :data:`BLENDING_ENGINE_KWARGS`. The constructor starts the engine (a minute or two); use the session
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
        check_runtime_importable()
        check_plugin_installed()
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
                                      f"{package_version('vllm') or ''} EngineArgs; check --engine-args.")
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


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="LMCache KV blending without a server: precompute each chunk's KV, then answer a "
                    "question over system prompt + chunks + question; prints the answer, the TTFT of a "
                    "full-prefill baseline and of the blended run, and the speedup.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub model id or local model directory")
    p.add_argument("--chunks", nargs="+", type=Path, required=True, metavar="FILE",
                   help="chunk text files, in prompt order (each tokenized on its own and cached separately)")
    p.add_argument("--sys-prompt-file", type=Path, default=DEFAULT_SYS_PROMPT_FILE,
                   help="system prompt file (default: data/sys_prompt.txt)")
    p.add_argument("--question", required=True, help="the question asked after the chunks")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="LMCache yaml (default: lmcache_configs/offline.yaml)")
    p.add_argument("--max-tokens", type=_positive_int, default=DEFAULT_MAX_TOKENS, help="answer length limit")
    p.add_argument("--max-model-len", type=_positive_int, default=None,
                   help="vLLM max_model_len (default: the model's own context length)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of GPU memory vLLM may use (default: vLLM's)")
    p.add_argument("--engine-args", default="",
                   help='extra vLLM engine flags, as for the app, e.g. "--load-format dummy '
                        '--enforce-eager": --name value -> name=value (JSON-decoded when it parses), '
                        "--name -> True, --no-name -> False")
    p.add_argument("--repeats", type=_positive_int, default=DEFAULT_REPEATS,
                   help="runs of each of baseline and blended (the median is reported)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (logs go to stderr)")
    p.add_argument("--output", type=Path, default=None, help="also write the JSON result to this file")
    p.add_argument("--dry-run", action="store_true",
                   help="check inputs, print the prompt layout, engine arguments and environment; "
                        "start nothing")
    return p


@dataclass
class Plan:
    """Everything checked and computed before vLLM is imported."""

    model: str
    config_path: Path
    lmcache_config: dict
    extra_kwargs: dict[str, Any]
    kwargs: dict[str, Any]
    env: dict[str, str]
    sys_prompt: str
    chunks: list[Chunk]
    question: str
    prompts: ChunkPrompts
    blend: BlendPrompts
    context_limit: int | None
    limit_source: str
    gpus: list[preflight.Gpu] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model, "lmcache_config_file": str(self.config_path),
            "lmcache_config": self.lmcache_config, "engine_kwargs": self.kwargs, "env": self.env,
            "chunks": self.blend.chunk_names,
            "prompt_tokens": self.blend.breakdown(),
            "precompute_requests": [len(r) for r in self.blend.precompute],
            "context_limit": self.context_limit, "context_limit_source": self.limit_source,
            "plugin": plugin_problem() or f"{PLUGIN_NAME} -> {PLUGIN_TARGET} installed",
            "gpus": [g.name for g in self.gpus],
        }


def prepare(args: argparse.Namespace, *, check_gpu: bool = True) -> Plan:
    """Validate every input and build the prompts — all before vLLM is imported, so errors come fast.

    Order: arguments and files (cheap, the user's own), GPU, plugin install, model and tokenizer (may
    download), prompt length.
    """
    if args.gpu_memory_utilization is not None and not 0.05 <= args.gpu_memory_utilization <= 0.98:
        raise UserFacingError("--gpu-memory-utilization must be between 0.05 and 0.98.")
    if not args.question.strip():
        raise UserFacingError("--question is empty: ask something.")
    config = preflight.check_lmcache_config(args.config)
    flags: dict[str, Any] = {}
    if args.max_model_len is not None:
        flags["max_model_len"] = args.max_model_len
    if args.gpu_memory_utilization is not None:
        flags["gpu_memory_utilization"] = args.gpu_memory_utilization
    extra = parse_engine_args(args.engine_args)
    both = sorted(set(flags) & set(extra))
    if both:
        flag = "--" + both[0].replace("_", "-")
        raise UserFacingError(f"{flag} is given both as a flag and in --engine-args: keep one.")
    extra = {**flags, **extra}
    kwargs = build_engine_kwargs(args.model, extra)
    sys_prompt = read_sys_prompt(args.sys_prompt_file)
    chunks = [load_chunk_file(path) for path in args.chunks]
    gpus = require_gpu() if check_gpu else []
    if check_gpu:
        check_plugin_installed()
    settings = Settings(model=args.model, hf_token=os.environ.get("HF_TOKEN") or None)
    preflight.check_model(settings)
    tokenizer = load_tokenizer(settings.tokenizer_source, token=settings.hf_token)
    prompts = ChunkPrompts(tokenizer, sys_prompt, LmcacheConfig.from_mapping(config).separator)
    blend = prompts.build(chunks, args.question)
    if "max_model_len" in kwargs:
        limit, source = int(kwargs["max_model_len"]), "--max-model-len"
    else:
        limit, source = model_context_limit(args.model), "the model's config.json"
    check_fits(blend, args.max_tokens, limit, source)
    return Plan(model=args.model, config_path=args.config, lmcache_config=config, extra_kwargs=extra,
                kwargs=kwargs, env=engine_env(args.config, args.model), sys_prompt=sys_prompt, chunks=chunks,
                question=args.question, prompts=prompts, blend=blend, context_limit=limit,
                limit_source=source, gpus=gpus)


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


def print_plan(plan: Plan, as_json: bool, out: TextIO) -> None:
    info = plan.describe()
    if as_json:
        print(json.dumps({"tool": PROG, "dry_run": True, **info}, indent=2), file=out)
        return
    print(f"# {PROG} --dry-run: nothing is started.", file=out)
    print(f"model: {plan.model}\nLMCache config: {plan.config_path}", file=out)
    print(f"prompt: {plan.blend.describe()}", file=out)
    print(f"precompute requests (tokens): {info['precompute_requests']}", file=out)
    limit = (f"{plan.context_limit} ({plan.limit_source})" if plan.context_limit
             else "unknown until the engine starts")
    print(f"context limit: {limit}", file=out)
    print("env: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(plan.env.items())), file=out)
    print(f"vllm.LLM kwargs: {json.dumps(plan.kwargs)}", file=out)
    print(f"plugin: {info['plugin']}", file=out)


@contextlib.contextmanager
def _stdout_into_stderr(enabled: bool) -> Iterator[None]:
    """Point file descriptor 1 at stderr while the engine runs, so --json keeps stdout for the JSON.

    vLLM logs to stdout, and its engine-core process inherits descriptor 1; redirecting the descriptor
    (not just sys.stdout) catches both.
    """
    if not enabled:
        yield
        return
    try:
        saved = os.dup(1)
    except OSError:
        yield
        return
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def write_output(record: dict[str, Any], path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise UserFacingError(f"Cannot write --output {path}: {exc.strerror}.") from exc
    log.info("wrote %s", path)


def run(args: argparse.Namespace) -> int:
    plan = prepare(args, check_gpu=not args.dry_run)
    if args.dry_run:
        print_plan(plan, args.json, sys.stdout)
        return 0
    session: BlendSession | None = None
    with _stdout_into_stderr(args.json):
        try:
            session = BlendSession(plan.model, plan.config_path, prompts=plan.prompts,
                                   max_tokens=args.max_tokens, check_gpu=False, **plan.extra_kwargs)
            measured = measure(session, plan, args.repeats)
        finally:
            if session is not None:
                session.close()
    record = result_record(plan, args, measured)
    if args.output is not None:
        write_output(record, args.output)
    if args.json:
        print(json.dumps(record, indent=2), flush=True)
    else:
        print_report(record, sys.stdout)
    return 0


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # SIGTERM unwinds through close() like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """CLI entry: 0 on success, 2 with one ``kvdemo.offline: <message>`` line for problems a user can fix."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenize before vLLM forks its engine
    try:
        previous = signal.signal(signal.SIGTERM, _raise_exit)
    except ValueError:  # not the main thread
        previous = None
    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except UserFacingError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (any engine started was shut down).", file=sys.stderr, flush=True)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
