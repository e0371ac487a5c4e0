"""What offline blending gives vLLM: defaults, ``vllm.LLM`` keyword arguments, environment, request settings.

The LMCache engine's own settings (connector, no prefix caching, FlashAttention, plugin switch, LMCache's
config file) come from :mod:`kvdemo.engines`, where the app's ``vllm serve`` engine gets them too, so
the offline engine and the server engine cannot drift apart. Everything here is pure: no vLLM, no GPU.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import REPO_ROOT, Settings
from ..engines import lmcache_engine_kwargs, real_engine_env
from ..errors import UserFacingError

log = logging.getLogger("kvdemo.offline")

PROG = "kvdemo.offline"
DEFAULT_CONFIG = REPO_ROOT / "lmcache_configs" / "offline.yaml"
DEFAULT_SYS_PROMPT_FILE = REPO_ROOT / "data" / "sys_prompt.txt"
DEFAULT_MAX_TOKENS = 128
DEFAULT_REPEATS = 3
# Engine settings LMCache blending needs; the server's LMCache engine gets the same as `vllm serve` flags
# (kvdemo.engines.lmcache_engine_flags).
BLENDING_ENGINE_KWARGS: dict[str, Any] = lmcache_engine_kwargs()
SKIP_SAVE = "lmcache.skip_save"

TTFT_FROM_METRICS = "vllm RequestOutput.metrics.first_token_latency (request arrival -> first token)"
TTFT_FROM_WALL_CLOCK = "wall clock of LLM.generate(max_tokens=1)"


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
    blending = lmcache_engine_kwargs()
    kwargs: dict[str, Any] = {"model": model, **blending, "disable_log_stats": False}
    if "attention_config" in extra:
        kwargs.pop("attention_backend")  # vLLM refuses both at once
    for key, value in extra.items():
        if key in blending and value != blending[key]:
            log.warning("engine argument %s=%r overrides %r, which LMCache blending needs; "
                        "blending may not work", key, value, blending[key])
        if key == "disable_log_stats" and value:
            log.warning("disable_log_stats=True: vLLM fills no request metrics; TTFT falls back to %s",
                        TTFT_FROM_WALL_CLOCK)
        kwargs[key] = value
    return kwargs


def engine_env(config: Path, model: str) -> dict[str, str]:
    """Environment the engine needs, set before vLLM is imported so its engine-core process inherits it.

    The variables the app gives its LMCache engine (:func:`kvdemo.engines.real_engine_env`): the plugin
    switch, LMCache's config file, no flashinfer sampler JIT, stable hashes, no telemetry, and offline Hub
    access for a local model directory. The config path is made absolute: the engine-core process must
    find it whatever its working directory.
    """
    return real_engine_env(lmcache=True, lmcache_config=Path(config).expanduser().resolve(),
                           local_model=Settings(model=model).is_local_model)


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
