"""The LMCache yaml is the one source of the separator: the app's prompts follow blend_special_str.

The bug this guards: the app spliced a hard-coded " # # " while the 🚀 engine split on the yaml's
blend_special_str, so editing the yaml silently stopped all chunk reuse.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, SIM_MAX_MODEL_LEN
from helpers import free_ports

from kvdemo.config import parse_settings
from kvdemo.errors import UserFacingError
from kvdemo.lmcache_config import LmcacheConfig
from kvdemo.main import main as app_main
from kvdemo.prompts import DEFAULT_SEPARATOR, PromptBuilder
from kvdemo.runtime import Runtime

BLEND_YAML = REPO_ROOT / "lmcache_configs" / "blend.yaml"
OTHER_SEPARATOR = " ## "


def yaml_with_separator(tmp_path: Path, separator: str) -> Path:
    data = yaml.safe_load(BLEND_YAML.read_text())
    data["blend_special_str"] = separator
    path = tmp_path / "blend-other-separator.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_configs_parse():
    blend = LmcacheConfig.load(BLEND_YAML)
    assert (blend.separator, blend.blending, blend.chunk_size, blend.recompute_ratio) == (" # # ", True, 256, 0.15)
    share = LmcacheConfig.load(REPO_ROOT / "lmcache_configs" / "share.yaml")
    assert not share.blending
    assert LmcacheConfig.from_mapping({}) == LmcacheConfig(separator=DEFAULT_SEPARATOR)


def test_bad_yaml_is_one_line(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: [1, 2\n")
    with pytest.raises(UserFacingError, match="not valid YAML"):
        LmcacheConfig.load(bad)


def test_dry_run_shows_the_separator_in_use(tmp_path: Path, capsys):
    path = yaml_with_separator(tmp_path, OTHER_SEPARATOR)
    assert app_main(["--simulate", "--dry-run", "--lmcache-config", str(path)]) == 0
    assert f"blend_special_str {OTHER_SEPARATOR!r}" in capsys.readouterr().out


def test_another_separator_in_the_yaml_still_reuses_chunks(tmp_path: Path, tokenizer, library):
    """Simulated 🚀 engine and the app's prompts both follow the yaml: reordered chunks are reused."""
    path = yaml_with_separator(tmp_path, OTHER_SEPARATOR)
    ports = free_ports(3)
    runtime = Runtime(parse_settings(["--simulate", "--sim-speed", "20", "--max-model-len", str(SIM_MAX_MODEL_LEN),
                                      "--lmcache-config", str(path), "--port", str(ports[0]),
                                      "--engine-ports", f"{ports[1]},{ports[2]}", "--log-dir", str(tmp_path)]))
    try:
        runtime.start()
        assert runtime.builder.separator == OTHER_SEPARATOR
        names = list(library.chunks)[:4]
        for prompt in runtime.builder.precompute_prompts(names):
            asyncio.run(_ask(runtime, prompt))
        order = names[:]
        random.Random(3).shuffle(order)
        question = "Which chunk talks about scopes?"
        prompt = runtime.builder.build(order, question)
        cached = asyncio.run(_ask(runtime, prompt, skip_save=True))
        assert cached >= 0.9 * (len(prompt) - len(runtime.builder.question_ids(question)))
        # what the app did before: the default separator's ids while the engine splits on the yaml's
        stale = PromptBuilder(tokenizer, library).build(order, question)
        assert asyncio.run(_ask(runtime, stale, skip_save=True)) < 0.1 * len(stale)
    finally:
        runtime.stop()


async def _ask(runtime: Runtime, ids: list[int], skip_save: bool = False) -> int:
    client = runtime.lmcache_engine.client()
    try:
        _, stats = await client.complete(ids, max_tokens=1, skip_save=skip_save)
    finally:
        await client.close()
    return stats.cached_tokens or 0
