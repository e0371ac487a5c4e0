"""Shared fixtures: the bundled tokenizer, the real chunk library, and two simulated engines."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from helpers import free_ports

from kvdemo.config import SIM_TOKENIZER_DIR, GpuSlot, parse_settings
from kvdemo.engines import EngineProcess, EngineSpec
from kvdemo.prompts import ChunkLibrary, PromptBuilder, load_tokenizer
from kvdemo.runtime import EngineHandle, Runtime
from kvdemo.scenarios import blend

SIM_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"  # the default model: simulated engines use the bundled tokenizer
SIM_SPEED = 2.0  # simulated delays halved: large enough margins for TTFT comparisons on a busy 2-core machine
SIM_MAX_MODEL_LEN = 32768
LABELS = [blend.LMCACHE_LABEL, blend.PLAIN_LABEL]


# Slow tests in files this conftest does not own the markers of (kept apart so that those files stay untouched).
SLOW_ELSEWHERE = {
    "tests/test_quality.py::test_quality_bench_against_simulated_engines": "starts simulated engines per ratio",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.nodeid in SLOW_ELSEWHERE:
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(str(SIM_TOKENIZER_DIR))


@pytest.fixture(scope="session")
def library() -> ChunkLibrary:
    return ChunkLibrary.load(REPO_ROOT / "data")


@pytest.fixture(scope="session")
def builder(tokenizer, library) -> PromptBuilder:
    return PromptBuilder(tokenizer, library)


@pytest.fixture(scope="session")
def sim_engines(tmp_path_factory) -> dict[str, EngineHandle]:
    """A simulated 🚀 (lmcache mode) and 🐢 (plain mode) engine, real HTTP subprocesses, for the session.

    Tests that care about cache state use their own system prompt, so they do not see each other's caches.
    """
    log_dir = tmp_path_factory.mktemp("sim-engine-logs")
    ports = free_ports(2)
    handles: dict[str, EngineHandle] = {}
    for key, lmcache, port in (("lmcache", True, ports[0]), ("plain", False, ports[1])):
        spec = EngineSpec(key=key, label=f"sim-{key}", lmcache=lmcache, port=port, slot=GpuSlot(None, 0.0, 1),
                          model=SIM_MODEL, max_model_len=SIM_MAX_MODEL_LEN, simulate=True, sim_speed=SIM_SPEED,
                          lmcache_config=REPO_ROOT / "lmcache_configs" / "blend.yaml" if lmcache else None)
        handles[key] = EngineHandle(spec, EngineProcess(spec, log_dir))
    try:
        for h in handles.values():
            h.process.start()
        for h in handles.values():
            h.startup_s = h.process.wait_healthy(60, poll_s=0.1)
            h.model_name = SIM_MODEL
        yield handles
    finally:
        for h in handles.values():
            h.process.stop(grace_s=5)


def make_runtime(builder, *flags: str, handles: dict[str, EngineHandle] | None = None) -> Runtime:
    """A simulated-mode Runtime without start(): its engines are `handles` (or planned, not started)."""
    runtime = Runtime(parse_settings(["--simulate", "--max-model-len", str(SIM_MAX_MODEL_LEN), *flags]))
    runtime.builder = builder
    if handles is None:  # engines that are planned but not started (enough for validation)
        runtime.engines = [EngineHandle(spec, None) for spec in runtime.plan()]
    else:
        runtime.engines = [EngineHandle(dataclasses.replace(h.spec, label=label), h.process, h.model_name)
                           for h, label in zip(handles.values(), LABELS)]
    return runtime


# --------------------------------------------------------------------------------------------------
# Tiny random Llamas for the CacheBlend oracle's tests (torch and transformers only where installed)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """(torch, a 4-layer random LlamaForCausalLM, its kvdemo.blend_oracle.ManualLlama); skipped without torch."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from kvdemo import blend_oracle

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    torch.set_grad_enabled(False)
    return torch, model, blend_oracle.ManualLlama(model)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A random 3-layer Llama model directory with the simulator's tokenizer (the oracle's whole-run tests)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(SIM_TOKENIZER_DIR))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
    model_dir = tmp_path / "tiny"
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir

