"""Module paths the fixes patch (vllm 0.22.0 / lmcache 0.5.3), in one place so a rename shows up once."""

MOD_WORKER = "vllm.v1.worker.gpu_worker"
MOD_VLLM_LMCACHE_CONNECTOR = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector"
MOD_LMC_VLLM_UTILS = "lmcache.integration.vllm.utils"
MOD_MODEL_UTILS = "lmcache.v1.compute.models.utils"
MOD_LLAMA = "lmcache.v1.compute.models.llama"
MOD_BLENDER = "lmcache.v1.compute.blend.blender"
MOD_TOKEN_DB = "lmcache.v1.token_database"
MOD_ROPE = "lmcache.v1.compute.positional_encoding"
MOD_GPU_CONNECTORS = "lmcache.v1.gpu_connector.gpu_connectors"
MOD_MEMORY = "lmcache.v1.memory_management"
MOD_ADAPTER = "lmcache.integration.vllm.vllm_v1_adapter"
MOD_CACHE_ENGINE = "lmcache.v1.cache_engine"
MOD_MODEL_BASE = "lmcache.v1.compute.models.base"
MOD_LOOKUP_CLIENT = "lmcache.v1.lookup_client.lmcache_lookup_client"
MOD_ATTN_METADATA = "lmcache.v1.compute.attention.metadata"
MOD_FLASH_ATTN = "lmcache.v1.compute.attention.flash_attn"

# The sync, pipeline and mask fixes replace or depend on LMCache code they copied, so they are only applied
# to the LMCache versions whose source the copies were taken from.
COPIED_LMCACHE_VERSIONS: tuple[str, ...] = ("0.5.3",)
