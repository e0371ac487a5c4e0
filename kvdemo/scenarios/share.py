"""The sharing scenario: two LMCache engines on one shared KV store (A stores, B loads), and two plain
vLLM engines next to them for comparison."""

from __future__ import annotations

from pathlib import Path

from ..config import Settings, plan_gpus
from ..engines import EngineSpec

ENGINES = (  # key, label, lmcache
    ("lmcache_a", "🚀 vLLM + LMCache (A)", True),
    ("lmcache_b", "🚀 vLLM + LMCache (B)", True),
    ("plain_a", "🐢 plain vLLM (A)", False),
    ("plain_b", "🐢 plain vLLM (B)", False),
)


def engine_specs(settings: Settings, gpus: list[int], lmcache_config: Path, store_dir: Path | None,
                 store_url: str | None = None) -> list[EngineSpec]:
    """Four engines spread over the GPUs (4 GPUs: one each; fewer: several per GPU, memory split)."""
    slots = plan_gpus(len(ENGINES), [] if settings.simulate else gpus)
    attach = settings.attach or []
    specs = []
    for i, (key, label, lmcache) in enumerate(ENGINES):
        specs.append(EngineSpec(
            key=key, label=label, lmcache=lmcache, port=settings.engine_ports[i], slot=slots[i], model=settings.model,
            max_model_len=settings.max_model_len, simulate=settings.simulate,
            lmcache_config=lmcache_config if lmcache else None, extra_args=list(settings.engine_args),
            sim_store_dir=store_dir if (settings.simulate and lmcache) else None,  # stand-in for the fs connector
            sim_store_url=store_url if (settings.simulate and lmcache) else None,  # ... for LMCache's Redis one
            gpu_memory_utilization=settings.gpu_memory_utilization, kv_cache_gib=settings.kv_cache_gib,
            local_model=settings.is_local_model, sim_speed=settings.sim_speed,
            url_override=attach[i] if i < len(attach) else None))
    return specs
