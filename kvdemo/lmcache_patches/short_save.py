"""Fix 'short': a prompt shorter than one LMCache chunk is stored when only a partial chunk of it was hit.

WHY (seen on an H200 with an uploaded document, lmcache 0.5.3): the last chunk of an upload was 248 tokens.
Its precompute request found 1 token in LMCache (the ``[BOS]`` segment every blended prompt starts with), below
``min_retrieve_tokens``, so nothing was loaded, but ``RequestTracker.from_new_request`` still records that
hit as ``num_saved_tokens = 1``. ``ReqMeta.from_request_tracker`` then skips the save because "a save already
happened and the prompt (248) has not reached the next chunk boundary (256)" — a rule meant for later
steps of a request that was saved. The chunk was never stored, and every question that put it before other
chunks lost the reuse of everything after it (LMCache's blended lookup stops at the first missing segment).

A hit shorter than one chunk cannot skip anything when saving (the adapter aligns the skipped prefix down to
a chunk boundary, i.e. to 0), so recording it as already saved has no use but this wrong skip. Here such a
hit is recorded as 0 saved tokens; hits of a chunk or more are left as LMCache records them.
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
