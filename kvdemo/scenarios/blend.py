"""The blending scenario: 🚀 vLLM + LMCache (blending on) next to 🐢 plain vLLM (prefix caching on)."""

from __future__ import annotations

from ..config import Settings, plan_gpus
from ..engine_handle import EngineHandle
from ..engines import EngineSpec
from ..kvstore import KvStore
from ..runtime_view import RuntimeView
from .base import PrecomputePlan, Scenario

LMCACHE_LABEL = "🚀 vLLM + LMCache"
PLAIN_LABEL = "🐢 plain vLLM"


class BlendScenario(Scenario):
    name = "blend"
    n_engines = 2

    def engine_specs(self, settings: Settings, gpus: list[int], kv_store: KvStore | None = None) -> list[EngineSpec]:
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

    def precompute_plan(self, runtime: RuntimeView) -> PrecomputePlan:
        """Store every chunk's KV (and the system prompt's) in the LMCache engine, then warm each engine up."""
        segments = runtime.precompute_prompts()
        requests = [(runtime.lmcache_engine, ids, False) for ids in segments]
        requests += [(h, ids, True) for h, ids in warm_up_prompts(runtime)]
        return PrecomputePlan("precompute", requests, tuple(segments[0]) if segments else None)

    def skip_save(self, handle: EngineHandle) -> bool:
        """Blended questions are not worth storing (and storing is on the TTFT path)."""
        return handle.spec.lmcache

    def restart_redoes_precompute(self, handle: EngineHandle) -> bool:
        """The LMCache engine's chunk caches died with it."""
        return handle.spec.lmcache


def warm_up_prompts(runtime: RuntimeView) -> list[tuple[EngineHandle, list[int]]]:
    """One request per engine, sent once the chunks are stored, that stores nothing a question could reuse.

    As long as the page's default selection. 🚀 gets a real blend (the default chunks reversed; the runtime
    sends it with skip_save); 🐢 the same length with each chunk's tokens reversed, so that its prefix cache
    keeps nothing beyond the system prompt, which every question shares anyway.
    WHY: a fresh engine's first blend is slow (1.6 s on an H100, benchmarks/results/blend-h100-profile.md).
    """
    b = runtime.builder
    assert b is not None
    names = b.page_selection(runtime.max_model_len)[::-1]
    if not names:
        return []
    sys_ids = b.sys_ids()
    question = b.question_ids("Warm-up request: answer with one word.")
    chunks = [b.chunk_ids(n) for n in names]
    return [(h, b.assemble(sys_ids, chunks if h.spec.lmcache else [c[::-1] for c in chunks], question))
            for h in runtime.engines]


SCENARIO = BlendScenario()
