"""LMCache KV blending in a script, without a server: vLLM's in-process ``LLM`` with the LMCache connector.

The offline counterpart of LMCache's ``examples/blend_kv_v1/blend.py``, built on the same pieces as the
app's server path, so both blend the same way:

* prompts are token ids assembled by :class:`kvdemo.prompts.PromptBuilder` (``assemble`` /
  ``precompute_layout``): ``[BOS] + sys + SEP + c1 + ... + SEP + cN + SEP + question``, every piece
  tokenized on its own, so each chunk's KV is found again wherever the chunk sits;
* the engine gets the LMCache engine's settings of :mod:`kvdemo.engines` (``lmcache_engine_kwargs``:
  the LMCache connector, no prefix caching, FlashAttention; ``real_engine_env``: ``BASE_ENGINE_ENV``,
  LMCache's config file and ``KVDEMO_LMCACHE_PLUGIN=1``, which switches on :mod:`kvdemo.vllm_plugin`:
  model registration with LMCache's blender, Mistral mapping, LMCache fixes). vLLM loads that plugin
  through the ``kvdemo_lmcache`` entry point in every process it starts, so the project must be
  pip-installed (``pip install -e .``; :func:`kvdemo.preflight.check_plugin_installed` says so).

One job a module:

* :mod:`.session` — :class:`BlendSession`, the programmatic API (start, precompute, generate, close);
* :mod:`.prompts` — chunk files/texts → token-id prompts (:class:`ChunkPrompts`, :func:`check_fits`);
* :mod:`.settings` — defaults, ``vllm.LLM`` keyword arguments, environment, per-request settings;
* :mod:`.plan` — the CLI's inputs checked and prompts built before vLLM is imported (``--dry-run``);
* :mod:`.bench` — the CLI's warm-up, baseline and blended repeats, and their record and report;
* :mod:`.cli` — argument parsing and ``main`` (``python -m kvdemo.offline``, see ``__main__``).

This package re-exports the names the single ``kvdemo/offline.py`` had, so ``from kvdemo.offline import
BlendSession`` (and the rest) keeps working.
"""

from ..preflight import (
    PLUGIN_GROUP,
    PLUGIN_NAME,
    PLUGIN_TARGET,
    VERIFIED_VERSIONS,
    check_plugin_installed,
    check_runtime_importable,
    model_context_limit,
    package_version,
    plugin_problem,
)
from ..prompts import load_tokenizer
from .bench import measure, print_report, result_record, write_output
from .cli import build_parser, main, run
from .plan import Plan, prepare, print_plan
from .prompts import BlendPrompts, ChunkLike, ChunkPrompts, check_fits, load_chunk_file, read_sys_prompt
from .session import BlendSession, GenerateResult, PrecomputeResult, require_gpu
from .settings import (
    BLENDING_ENGINE_KWARGS,
    DEFAULT_CONFIG,
    DEFAULT_MAX_TOKENS,
    DEFAULT_REPEATS,
    DEFAULT_SYS_PROMPT_FILE,
    PROG,
    SKIP_SAVE,
    TTFT_FROM_METRICS,
    TTFT_FROM_WALL_CLOCK,
    build_engine_kwargs,
    engine_env,
    parse_engine_args,
    ttft_from_output,
    with_skip_save,
)

__all__ = [
    "BLENDING_ENGINE_KWARGS", "DEFAULT_CONFIG", "DEFAULT_MAX_TOKENS", "DEFAULT_REPEATS",
    "DEFAULT_SYS_PROMPT_FILE", "PLUGIN_GROUP", "PLUGIN_NAME", "PLUGIN_TARGET", "PROG", "SKIP_SAVE",
    "TTFT_FROM_METRICS", "TTFT_FROM_WALL_CLOCK", "VERIFIED_VERSIONS",
    "BlendPrompts", "BlendSession", "ChunkLike", "ChunkPrompts", "GenerateResult", "Plan", "PrecomputeResult",
    "build_engine_kwargs", "build_parser", "check_fits", "check_plugin_installed", "check_runtime_importable",
    "engine_env", "load_chunk_file", "load_tokenizer", "main", "measure", "model_context_limit",
    "package_version", "parse_engine_args", "plugin_problem", "prepare", "print_plan", "print_report",
    "read_sys_prompt", "require_gpu", "result_record", "run", "ttft_from_output", "with_skip_save",
    "write_output",
]
