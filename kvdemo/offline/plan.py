"""The CLI's plan: every input checked and the prompts built before vLLM is imported, so errors come fast.

``--dry-run`` prints the plan (prompt layout, engine arguments, environment, plugin) and starts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .. import preflight
from ..config import Settings
from ..errors import UserFacingError
from ..lmcache_config import LmcacheConfig
from ..prompts import Chunk, load_tokenizer
from .prompts import BlendPrompts, ChunkPrompts, check_fits, load_chunk_file, read_sys_prompt
from .session import require_gpu
from .settings import PROG, build_engine_kwargs, engine_env, parse_engine_args


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
            "plugin": (preflight.plugin_problem()
                       or f"{preflight.PLUGIN_NAME} -> {preflight.PLUGIN_TARGET} installed"),
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
        preflight.check_plugin_installed()
    settings = Settings(model=args.model, hf_token=os.environ.get("HF_TOKEN") or None)
    preflight.check_model(settings)
    tokenizer = load_tokenizer(settings.tokenizer_source, token=settings.hf_token)
    prompts = ChunkPrompts(tokenizer, sys_prompt, LmcacheConfig.from_mapping(config).separator)
    blend = prompts.build(chunks, args.question)
    if "max_model_len" in kwargs:
        limit, source = int(kwargs["max_model_len"]), "--max-model-len"
    else:
        limit, source = preflight.model_context_limit(args.model), "the model's config.json"
    check_fits(blend, args.max_tokens, limit, source)
    return Plan(model=args.model, config_path=args.config, lmcache_config=config, extra_kwargs=extra,
                kwargs=kwargs, env=engine_env(args.config, args.model), sys_prompt=sys_prompt, chunks=chunks,
                question=args.question, prompts=prompts, blend=blend, context_limit=limit,
                limit_source=source, gpus=gpus)


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
