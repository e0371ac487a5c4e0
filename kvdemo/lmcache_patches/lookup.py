"""Speed fix 'lookup': the scheduler's lookup calls the LMCache engine in its own process instead of over ZMQ."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from .hooks import logger, wrap_method
from .targets import MOD_CACHE_ENGINE, MOD_LMC_VLLM_UTILS, MOD_LOOKUP_CLIENT
from .tokens import is_tensor


def patch_direct_lookup(module: ModuleType) -> None:
    """Wrap ``LMCacheLookupClient.lookup``: when the LMCache engine lives in this process, ask it directly.

    Makes the call the lookup server makes (``pin=True``, same arguments) and records the result as the
    client does; falls back to the ZMQ path when there is no engine here (one process per worker), more
    than one worker, or the direct call fails. The engine log says once which path lookups take.
    WHY: with one GPU the scheduler and the worker share one engine-core process, yet LMCache's lookup
    msgpack-encodes the whole prompt and sends it over ZMQ to a thread of that process while the GPU idles
    (its own ``enable_scheduler_bypass_lookup`` is allowed for MLA models only; docs/plugin.md).
    """
    def make(original: Any) -> Any:
        def lookup(self: Any, token_ids: Any, lookup_id: str, request_configs: dict | None = None) -> Any:
            engine = engine_in_this_process(self)
            if engine is not None:
                try:
                    result = direct_lookup(self, engine, token_ids, lookup_id, request_configs)
                except Exception as exc:  # noqa: BLE001 - the ZMQ path still works
                    logger.warning("kvdemo plugin: direct lookup failed (%s: %s); using LMCache's lookup server",
                                   type(exc).__name__, exc)
                else:
                    self.reqs_status[lookup_id] = result
                    say_lookup_path_once(self, "in this process (no ZMQ round trip)")
                    return result
            else:
                say_lookup_path_once(self, "through LMCache's lookup server (no LMCache engine of a single "
                                           "worker in this process)")
            return original(self, token_ids, lookup_id, request_configs)
        return lookup

    wrap_method(module, "LMCacheLookupClient.lookup", "lookup", make,
                "calls the engine of this process when there is one")


def say_lookup_path_once(client: Any, path: str) -> None:
    """Log once per lookup client which path its lookups take, so an engine log shows whether the fix acted."""
    if getattr(client, "_kvdemo_lookup_path", None) != path:
        client._kvdemo_lookup_path = path
        logger.info("kvdemo plugin: LMCache lookups go %s", path)


def engine_in_this_process(client: Any) -> Any:
    """The vLLM integration's LMCacheEngine if it was built in this process and serves the only worker."""
    transport = getattr(client, "transport", None)
    if getattr(transport, "world_size", None) != 1:
        return None
    builder_module = sys.modules.get(MOD_CACHE_ENGINE)
    utils_module = sys.modules.get(MOD_LMC_VLLM_UTILS)
    builder = getattr(builder_module, "LMCacheEngineBuilder", None)
    name = getattr(utils_module, "ENGINE_NAME", None)
    if builder is None or name is None:
        return None
    return builder.get(name)


def direct_lookup(client: Any, engine: Any, token_ids: Any, lookup_id: str, request_configs: dict | None) -> int:
    """What LMCache's lookup server computes for this request (blending: tokens; otherwise chunk hashes)."""
    configs = request_configs or None  # the server decodes "" (no configs) to None
    if client.enable_blending:
        tokens = token_ids if is_tensor(token_ids) or isinstance(token_ids, list) else list(token_ids)
        return int(engine.lookup(tokens=tokens, lookup_id=lookup_id, pin=True, request_configs=configs))
    hashes: list[Any] = []
    offsets: list[int] = []
    for start, end, key in client.token_database.process_tokens(token_ids, make_key=False):
        hashes.append(key)
        offsets.append(end - start)
    if not hashes:
        return 0
    return int(engine.lookup(hashes=hashes, offsets=offsets, lookup_id=lookup_id, pin=True,
                             request_configs=configs))


PATCHES = ((MOD_LOOKUP_CLIENT, patch_direct_lookup),)
