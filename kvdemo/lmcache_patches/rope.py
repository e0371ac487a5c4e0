"""Speed fix 'rope': FusedRope's cos/sin cache goes to the GPU once, not once per layer per request."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .hooks import wrap_method
from .targets import MOD_ROPE


def patch_fused_rope(module: ModuleType) -> None:
    """Wrap ``FusedRope.fused_encode`` so its cos/sin cache is moved to the K tensor's device once.

    WHY: ``FusedRope.__init__`` keeps ``rope.cos_sin_cache`` as created on the CPU (vLLM later rebinds
    the rope's own attribute to a GPU copy, the FusedRope reference stays stale), and ``fused_encode``
    calls ``self.cos_sin_cache.to(k.device)`` for every layer of every blended request: an unpinned
    host-to-device copy (~1 ms x 32 layers at Mistral-7B). Rebinding the attribute to the device copy
    makes the original's ``.to(k.device)`` a no-op; dtype and values are unchanged.
    """
    def make(original: Any) -> Any:
        def fused_encode(self: Any, old_positions: Any, new_positions: Any, k: Any) -> Any:
            cache = self.cos_sin_cache
            if cache.device != k.device:
                self.cos_sin_cache = cache.to(k.device)
            return original(self, old_positions, new_positions, k)
        return fused_encode

    wrap_method(module, "FusedRope.fused_encode", "rope", make, "keeps its cos/sin cache on the GPU")


PATCHES = ((MOD_ROPE, patch_fused_rope),)
