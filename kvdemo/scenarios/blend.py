"""The blending scenario: 🚀 vLLM + LMCache (blending on) next to 🐢 plain vLLM (prefix caching on)."""

from __future__ import annotations

from ..config import Settings, plan_gpus
from ..engines import EngineSpec

LMCACHE_LABEL = "🚀 vLLM + LMCache"
PLAIN_LABEL = "🐢 plain vLLM"


def engine_specs(settings: Settings, gpus: list[int]) -> list[EngineSpec]:
    """LMCache engine first, plain engine second; with 2+ GPUs each gets its own GPU."""
    slots = plan_gpus(2, [] if settings.simulate else gpus)
    common = {"model": settings.model, "max_model_len": settings.max_model_len, "simulate": settings.simulate,
              "extra_args": settings.engine_args, "gpu_memory_utilization": settings.gpu_memory_utilization,
              "kv_cache_gib": settings.kv_cache_gib, "local_model": settings.is_local_model,
              "sim_speed": settings.sim_speed}
    attach = settings.attach or [None, None]
    return [
        EngineSpec(key="lmcache", label=LMCACHE_LABEL, lmcache=True, port=settings.engine_ports[0],
                   slot=slots[0], lmcache_config=settings.lmcache_config_path, url_override=attach[0], **common),
        EngineSpec(key="plain", label=PLAIN_LABEL, lmcache=False, port=settings.engine_ports[1],
                   slot=slots[1], url_override=attach[1] if len(attach) > 1 else None, **common),
    ]
