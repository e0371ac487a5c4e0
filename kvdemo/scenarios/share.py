"""The sharing scenario: two LMCache engines on one shared KV store (A stores, B loads), and two plain
vLLM engines next to them for comparison."""

from __future__ import annotations

from ..config import Settings, plan_gpus
from ..engine_handle import EngineHandle
from ..engines import EngineSpec
from ..kvstore import KvStore
from ..runtime_view import RuntimeView
from .base import PrecomputePlan, Scenario

ENGINES = (  # key, label, lmcache
    ("lmcache_a", "🚀 vLLM + LMCache (A)", True),
    ("lmcache_b", "🚀 vLLM + LMCache (B)", True),
    ("plain_a", "🐢 plain vLLM (A)", False),
    ("plain_b", "🐢 plain vLLM (B)", False),
)


class ShareScenario(Scenario):
    name = "share"
    n_engines = len(ENGINES)
    uses_kv_store = True

    def engine_specs(self, settings: Settings, gpus: list[int], kv_store: KvStore) -> list[EngineSpec]:
        """Four engines spread over the GPUs (4 GPUs: one each; fewer: several per GPU, memory split)."""
        lmcache_config = kv_store.write_lmcache_config(settings.lmcache_config_path, settings.log_dir)
        store_dir, store_url = kv_store.directory, kv_store.redis_url
        slots = plan_gpus(len(ENGINES), [] if settings.simulate else gpus)
        attach = settings.attach or []
        specs = []
        for i, (key, label, lmcache) in enumerate(ENGINES):
            specs.append(EngineSpec(
                key=key, label=label, lmcache=lmcache, port=settings.engine_ports[i], slot=slots[i],
                model=settings.model, max_model_len=settings.max_model_len, simulate=settings.simulate,
                lmcache_config=lmcache_config if lmcache else None, extra_args=list(settings.engine_args),
                sim_store_dir=store_dir if (settings.simulate and lmcache) else None,  # stand-in for the fs connector
                sim_store_url=store_url if (settings.simulate and lmcache) else None,  # ... for LMCache's Redis one
                gpu_memory_utilization=settings.gpu_memory_utilization, kv_cache_gib=settings.kv_cache_gib,
                local_model=settings.is_local_model, sim_speed=settings.sim_speed,
                url_override=attach[i] if i < len(attach) else None))
        return specs

    def precompute_plan(self, runtime: RuntimeView) -> PrecomputePlan:
        """Preheat every engine once: nothing a question could reuse is cached (A must store it, B load it)."""
        return PrecomputePlan("preheat", [(h, preheat_prompt(runtime, h), False) for h in runtime.engines])

    def skip_save(self, handle: EngineHandle) -> bool:
        """Storing is the point: engine A stores what engine B then loads."""
        return False

    def restart_redoes_precompute(self, handle: EngineHandle) -> bool:
        """The preheat cached nothing that a restarted engine lacks."""
        return False


def preheat_prompt(runtime: RuntimeView, handle: EngineHandle) -> list[int]:
    """A short request unlike any document, so that an engine's first measured query is not a cold start."""
    b = runtime.builder
    assert b is not None
    text = f"Preheat request for {handle.spec.key}: say hello."
    return b.bos_ids + list(b.tokenizer.encode(text, add_special_tokens=False))


SCENARIO = ShareScenario()
