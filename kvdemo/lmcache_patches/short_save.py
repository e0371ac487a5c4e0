"""Fix 'short': a prompt shorter than one LMCache chunk is stored when only a partial chunk of it was hit.

A hit shorter than one chunk (e.g. the 1-token ``[BOS]`` segment, not loaded as it is below
``min_retrieve_tokens``) is recorded as 0 saved tokens; hits of a chunk or more are left as LMCache records
them. Saving can skip nothing for such a hit (the skipped prefix is aligned down to a chunk boundary, 0).
WHY: lmcache 0.5.3 records it as already saved and then skips the save until the next chunk boundary, so a
short prompt, such as an upload's last chunk, was never stored (docs/plugin.md).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .hooks import wrap_method
from .targets import MOD_ADAPTER


def patch_short_prompt_save(module: ModuleType) -> None:
    """Wrap ``RequestTracker.from_new_request`` (a static method: called on the class, never bound)."""
    def make(original: Any) -> Any:
        def from_new_request(lmcache_config: Any, new_request: Any, num_tokens_to_compute: int,
                             lmcache_cached_tokens: int, skip_save: bool) -> Any:
            tracker = original(lmcache_config, new_request, num_tokens_to_compute, lmcache_cached_tokens,
                               skip_save)
            chunk_size = int(getattr(lmcache_config, "chunk_size", 0) or 0)
            if 0 < tracker.num_saved_tokens < chunk_size:
                tracker.num_saved_tokens = 0
            return tracker
        return from_new_request

    wrap_method(module, "RequestTracker.from_new_request", "short", make,
                "stores prompts shorter than one chunk when a partial chunk of them was hit")


PATCHES = ((MOD_ADAPTER, patch_short_prompt_save),)
