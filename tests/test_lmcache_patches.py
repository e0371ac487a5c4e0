"""The plugin's patching helpers (wrap, mark, skip, unpatch) and its per-request telemetry, on fakes (no torch)."""

from __future__ import annotations

import json
import logging
import time
import types
from pathlib import Path
from typing import Any

import pytest

from kvdemo import vllm_plugin as vp
from kvdemo.lmcache_patches import hooks, telemetry


@pytest.fixture(autouse=True)
def _fresh_plugin():
    vp._reset_for_tests()
    yield
    vp._reset_for_tests()


def _fake_module() -> types.SimpleNamespace:
    class Engine:
        def run(self, x: int) -> int:
            """The original."""
            return x + 1

    return types.SimpleNamespace(__name__="fake.engine", Engine=Engine)


def test_wrap_method_wraps_once_marks_logs_and_unpatches(caplog):
    module = _fake_module()
    original = module.Engine.run

    def make(inner):
        def run(self, x):
            return inner(self, x) * 10
        return run

    with caplog.at_level(logging.INFO, logger=hooks.logger.name):
        assert hooks.wrap_method(module, "Engine.run", "demo", make, "multiplies by ten")
        assert not hooks.wrap_method(module, "Engine.run", "demo", make, "again")  # already wrapped
    assert module.Engine().run(1) == 20  # wrapped once, not twice
    assert module.Engine.run.__doc__ == "The original."  # functools.wraps
    assert hooks.already(module.Engine.run, "demo") and getattr(module.Engine.run, hooks.MARK) == "demo"
    applied = [r.getMessage() for r in caplog.records if "applied demo" in r.getMessage()]
    assert applied == ["kvdemo plugin: applied demo (fake.engine.Engine.run multiplies by ten)"]

    assert hooks.unpatch_all() == 1
    assert module.Engine.run is original and module.Engine().run(1) == 2


def test_stacked_wraps_unwind_newest_first():
    module = _fake_module()
    original = module.Engine.run
    hooks.wrap_method(module, "Engine.run", "a", lambda f: lambda self, x: f(self, x) + 100)
    hooks.wrap_method(module, "Engine.run", "b", lambda f: lambda self, x: f(self, x) * 2)
    assert module.Engine().run(1) == 204
    assert hooks.already(module.Engine.run, "a") and hooks.already(module.Engine.run, "b")
    assert hooks.unpatch_all() == 2 and module.Engine.run is original


def test_missing_target_is_logged_not_raised(caplog):
    module = _fake_module()
    with caplog.at_level(logging.WARNING, logger=hooks.logger.name):
        assert not hooks.wrap_method(module, "Engine.gone", "demo", lambda f: f)
    assert "fake.engine.Engine.gone not found in this version; fix 'demo' not applied" in caplog.text


# --------------------------------------------------------------------------------------------------
# Telemetry
# --------------------------------------------------------------------------------------------------


class _Meta:
    """LMCacheEngineMetadata's legacy shape: (layers, 2, chunk, kv heads, head size), bf16."""

    kv_shape = (4, 2, 256, 2, 8)
    kv_dtype = types.SimpleNamespace(itemsize=2)

    def get_shapes(self, n):
        raise AttributeError("old metadata")  # exercises the legacy path


def _request(req_id: str, n_tokens: int, hit: int, vllm_prefix: int, can_load: bool = True) -> Any:
    spec = types.SimpleNamespace(lmcache_cached_tokens=hit, vllm_cached_tokens=vllm_prefix, can_load=can_load)
    return types.SimpleNamespace(req_id=req_id, token_ids=list(range(n_tokens)), load_spec=spec)


def _read_records(directory: Path, n: int) -> list[dict]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [line for f in directory.glob("lmcache-*.jsonl") for line in f.read_text().splitlines()]
        if len(lines) >= n:
            return [json.loads(line) for line in lines]
        time.sleep(0.02)
    raise AssertionError(f"expected {n} telemetry records in {directory}")


def test_telemetry_records_each_loaded_request_with_its_blend(tmp_path):
    class Blender:
        common_metadata = types.SimpleNamespace(check_layers=[1])

        def __init__(self):
            self.metadata = types.SimpleNamespace(imp_indices=None)

        def process_qkv(self, q, k, v, residual, layer_id, attn_output, attn_metadata):
            if layer_id == 1:
                self.metadata.imp_indices = types.SimpleNamespace(shape=(len(q) // 10,))
            return q

    class Connector:
        enable_blending = True
        _lmcache_chunk_size = 256

        def __init__(self, requests):
            meta = types.SimpleNamespace(requests=requests)
            self._parent = types.SimpleNamespace(_get_connector_metadata=lambda: meta)
            self.blender = Blender()
            self.lmcache_engine = types.SimpleNamespace(metadata=_Meta())

        def start_load_kv(self, forward_context):
            for request in self._parent._get_connector_metadata().requests:
                if request.load_spec is not None and request.load_spec.can_load:
                    hit = request.load_spec.lmcache_cached_tokens
                    for layer in range(4):
                        self.blender.process_qkv(_Sized(hit), None, None, None, layer, None, None)
            return "loaded"

    adapter = types.SimpleNamespace(__name__="lmcache.integration.vllm.vllm_v1_adapter",
                                    LMCacheConnectorV1Impl=Connector)
    blender_module = types.SimpleNamespace(__name__="lmcache.v1.compute.blend.blender", LMCBlender=Blender)
    telemetry.patch_start_load_kv(adapter, tmp_path)
    telemetry.patch_process_qkv(blender_module)

    requests = [_request("cmpl-abc-0-1234", 9000, hit=8000, vllm_prefix=300),
                _request("cmpl-nohit-0-9", 500, hit=0, vllm_prefix=0, can_load=False),
                types.SimpleNamespace(req_id="decode", token_ids=[1], load_spec=None)]
    assert Connector(requests).start_load_kv(None) == "loaded"

    (record,) = _read_records(tmp_path, 1)
    per_token = 4 * 2 * 2 * 8 * 2
    assert record["req_id"] == "cmpl-abc-0-1234" and record["mode"] == "blend"
    assert record["prompt_tokens"] == 9000 and record["lmcache_hit_tokens"] == 8000
    assert record["vllm_prefix_tokens"] == 300 and record["loaded_tokens"] == 8000 - 256
    assert record["recomputed_tokens"] == 800 and record["blend_tokens"] == 8000
    assert record["kv_bytes_loaded"] == (8000 - 256) * per_token
    assert record["load_host_ms"] >= 0 and record["load_gpu_ms"] is None  # no CUDA here
    assert record["requests_in_step"] == 1


class _Sized:
    """A stand-in for a query tensor: only its shape is read (no GPU sync)."""

    def __init__(self, n: int) -> None:
        self.shape = (n,)

    def __len__(self) -> int:
        return self.shape[0]


def test_register_arms_telemetry_only_when_asked(monkeypatch, tmp_path):
    """Telemetry needs its directory (the app sets it) and the fix 'telemetry' (in 'all'; '-telemetry' drops it)."""
    armed: list[str] = []
    monkeypatch.setenv(vp.ENV_ENABLE, "1")
    monkeypatch.setenv(vp.ENV_FIXES, "telemetry")
    monkeypatch.setattr(hooks, "module_available", lambda name: True)
    monkeypatch.setattr(hooks, "when_imported", lambda name, cb: armed.append(name))
    vp.register()
    assert armed == []  # no directory
    monkeypatch.setenv(vp.ENV_TELEMETRY_DIR, str(tmp_path / "t"))
    arms: list[str] = []
    monkeypatch.setattr(vp.telemetry, "arm", lambda directory, when: arms.append(directory))
    for fixes in ("none", "all,-telemetry", "all"):
        vp._reset_for_tests()
        monkeypatch.setenv(vp.ENV_FIXES, fixes)
        vp.register()
    assert arms == [str(tmp_path / "t")]  # 'all' only
    monkeypatch.undo()
    monkeypatch.setenv(vp.ENV_ENABLE, "1")
    monkeypatch.setenv(vp.ENV_TELEMETRY_DIR, str(tmp_path / "t"))
    monkeypatch.setattr(hooks, "module_available", lambda name: True)
    monkeypatch.setattr(hooks, "when_imported", lambda name, cb: armed.append(name))
    armed.clear()
    vp._reset_for_tests()
    monkeypatch.setenv(vp.ENV_FIXES, "telemetry")
    vp.register()
    assert armed == ["lmcache.integration.vllm.vllm_v1_adapter", "lmcache.v1.compute.blend.blender"]
    assert (tmp_path / "t").is_dir()
