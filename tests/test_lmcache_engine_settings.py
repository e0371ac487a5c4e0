"""The LMCache engine's settings have one definition (kvdemo.engines) for the app's `vllm serve` engine and
for kvdemo.offline's in-process vllm.LLM, so the two cannot drift apart."""

from __future__ import annotations

import shlex
from pathlib import Path

from kvdemo import offline, vllm_plugin
from kvdemo.config import GpuSlot
from kvdemo.engines import PLUGIN_ENV, EngineSpec, lmcache_engine_flags, lmcache_engine_kwargs

CONFIG = Path("lmcache_configs/offline.yaml").resolve()


def lmcache_spec(tmp_path: Path | None = None, **kw) -> EngineSpec:
    return EngineSpec(key="lmcache", label="x", lmcache=True, port=8000, slot=GpuSlot(0, 0.9, 1),
                      model=str(tmp_path or "mistralai/Mistral-7B-Instruct-v0.2"), max_model_len=32768,
                      lmcache_config=CONFIG, **kw)


def test_server_flags_are_the_offline_kwargs():
    assert lmcache_engine_flags() == [
        "--kv-transfer-config", '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}',
        "--no-enable-prefix-caching", "--attention-backend", "FLASH_ATTN"]
    argv = lmcache_spec().argv()
    start = argv.index("--kv-transfer-config")
    assert argv[start:start + len(lmcache_engine_flags())] == lmcache_engine_flags()
    # The server's flags, read the way offline reads --engine-args, are the offline engine's settings.
    assert offline.parse_engine_args(shlex.join(lmcache_engine_flags())) == lmcache_engine_kwargs()
    kwargs = offline.build_engine_kwargs("m")
    assert {k: kwargs[k] for k in lmcache_engine_kwargs()} == lmcache_engine_kwargs()


def test_kwargs_are_a_fresh_copy():
    lmcache_engine_kwargs()["kv_transfer_config"]["kv_role"] = "changed"
    assert lmcache_engine_kwargs()["kv_transfer_config"]["kv_role"] == "kv_both"


def test_offline_env_is_the_server_engines_env(tmp_path):
    server = lmcache_spec(tmp_path, local_model=True).env()
    assert server.pop("CUDA_VISIBLE_DEVICES") == "0"  # the app picks the GPU; offline uses what it is given
    assert offline.engine_env(CONFIG, str(tmp_path)) == server
    hub = lmcache_spec().env()
    hub.pop("CUDA_VISIBLE_DEVICES")
    assert offline.engine_env(CONFIG, "mistralai/Mistral-7B-Instruct-v0.2") == hub


def test_plugin_switch_is_the_one_the_plugin_reads():
    assert PLUGIN_ENV == vllm_plugin.ENV_ENABLE
    assert lmcache_spec().env()[PLUGIN_ENV] == "1"
