"""Fix 'mask': recomputed tokens attend to keys at or before their own position only.

LMCache 0.5.3 only shrinks the query length when the blender picks the tokens to recompute, so
FlashAttention's bottom-right causal mask lets every recomputed token see tokens after it. This fix keeps
the picked positions and takes an exact path (kvdemo.blend_mask) when there are fewer queries than keys.
It changes answers on purpose; it is judged by the quality benchmark's ratio sweep.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType
from typing import Any

from kvdemo import blend_mask

from .hooks import copied_version_matches, logger, wrap_method
from .targets import MOD_ATTN_METADATA, MOD_FLASH_ATTN

PLAN_ATTR = "_kvdemo_exact_plan"
_said: set[str] = set()
# Layers computed by the exact path / by LMCache's call after a fallback, since the engine started: the
# telemetry record of a request holds the difference over its load (per-request evidence, no sync).
layer_counts = {"exact": 0, "fallback": 0}


# Comma list: "eager" merges op by op (the A/B's before); "one" runs band + merge as one compiled region,
# "one,skip_guards" also skips Dynamo's guards after a request's first layer; unset: two regions (fused merge).
ENV_VARIANT = "KVDEMO_MASK_VARIANT"


@functools.cache
def split_options() -> dict[str, bool]:
    """The split path's options from ``KVDEMO_MASK_VARIANT`` (kvdemo.blend_mask.exact_attention_split)."""
    chosen = {v.strip() for v in os.environ.get(ENV_VARIANT, "").split(",") if v.strip()}
    return {"fused_merge": "eager" not in chosen, "one_region": "one" in chosen,
            "skip_guards": "one" in chosen and "skip_guards" in chosen}


@functools.cache
def flash_attn_varlen() -> Any:
    """vLLM's flash_attn_varlen_func or None, looked up once per process."""
    return blend_mask.vllm_flash_attn_varlen()


def say_once(key: str, text: str, *args: Any, level: int = logging.INFO) -> None:
    """One log line per process and kind (first exact layer, fallback): evidence without a line per layer."""
    if key not in _said:
        _said.add(key)
        logger.log(level, text, *args)


def reset() -> None:
    """Forget what was said, the layer counts and the FlashAttention lookup (tests)."""
    _said.clear()
    layer_counts.update(exact=0, fallback=0)
    flash_attn_varlen.cache_clear()
    split_options.cache_clear()


def _version_ok() -> bool:
    """The mask fix was written against lmcache 0.5.3's FlashAttention call (bottom-right causal, contiguous keys)."""
    return copied_version_matches("mask", "LMCFlashAttnMetadata/LMCFlashAttnBackend (FlashAttention call)")


def patch_mask_metadata(module: ModuleType) -> None:
    """Wrap ``LMCFlashAttnMetadata.update_from_top_indices`` to build the exact-attention plan once per request.

    The selected indices (sorted, one per recomputed token, equal to its key index) are known here, once
    per request, before the first layer that recomputes only them: the plan (block mask, tiles) is built
    here and reused by every later layer.
    """
    if not _version_ok():
        return

    def make(original: Any) -> Any:
        def update_from_top_indices(self: Any, top_indices: Any) -> Any:
            n_keys = int(self.max_seq_len)  # the original changes the query side only
            result = original(self, top_indices)
            plan = None
            if 0 < len(top_indices) < n_keys:
                try:
                    plan = blend_mask.build_plan(top_indices, n_keys, split=flash_attn_varlen() is not None)
                except Exception as exc:  # noqa: BLE001 - never break a blend: LMCache's own mask then
                    say_once("build-failed", "kvdemo plugin: mask: cannot build the exact plan (%s); "
                             "LMCache's bottom-right causal mask is used", exc, level=logging.WARNING)
            setattr(self, PLAN_ATTR, plan)
            return result
        return update_from_top_indices

    wrap_method(module, "LMCFlashAttnMetadata.update_from_top_indices", "mask", make,
                "builds the exact causal block mask of the recomputed tokens")


def patch_mask_attention(module: ModuleType) -> None:
    """Wrap ``LMCFlashAttnBackend.forward_contiguous``: fewer queries than keys and a plan built → exact path.

    The exact path is kvdemo.blend_mask.run_plan: vLLM's FlashAttention on the key blocks every query of a
    tile sees, FlexAttention on the diagonal band, merged by log-sum-exp. Anything it does not reproduce
    (sliding window, logit softcap, ALiBi, an FP8 KV cache) or any error goes to LMCache's FlashAttention
    call, logged once.
    """
    if not _version_ok():
        return

    def make(original: Any) -> Any:
        def forward_contiguous(self: Any, query: Any, key: Any, value: Any, output: Any, attn_metadata: Any,
                               **kwargs: Any) -> Any:
            plan = getattr(attn_metadata, PLAN_ATTR, None)
            impl = self.vllm_attn_impl
            if plan is not None and query.shape[0] < key.shape[0]:
                if exact_mask_applies(impl):
                    try:
                        output.copy_(blend_mask.run_plan(query, key, value, plan, impl.scale,
                                                         flash_attn_varlen(),
                                                         getattr(impl, "vllm_flash_attn_version", None),
                                                         **split_options()))
                        layer_counts["exact"] += 1
                        say_once("used", "kvdemo plugin: mask: exact causal attention for %d recomputed of %d "
                                 "tokens (%s)", query.shape[0], key.shape[0],
                                 "FlashAttention on fully visible blocks + FlexAttention on the diagonal band"
                                 if getattr(plan, "split", False) else "FlexAttention block mask")
                        return output
                    except Exception as exc:  # noqa: BLE001 - fall back for the rest of this request
                        setattr(attn_metadata, PLAN_ATTR, None)
                        say_once("attn-failed", "kvdemo plugin: mask: exact attention failed (%s: %s); LMCache's "
                                 "FlashAttention call is used", type(exc).__name__, exc, level=logging.WARNING)
                layer_counts["fallback"] += 1
            return original(self, query, key, value, output, attn_metadata, **kwargs)
        return forward_contiguous

    wrap_method(module, "LMCFlashAttnBackend.forward_contiguous", "mask", make,
                "takes the exact path when fewer queries than keys")


def exact_mask_applies(impl: Any) -> bool:
    """Whether FlexAttention with the plain causal block mask computes what this vLLM attention layer does."""
    window = getattr(impl, "sliding_window", None)
    if window not in (None, (-1, -1), [-1, -1]):
        say_once("window", "kvdemo plugin: mask: sliding window %s: LMCache's mask is used", window)
        return False
    if getattr(impl, "logits_soft_cap", None) or getattr(impl, "alibi_slopes", None) is not None:
        say_once("softcap", "kvdemo plugin: mask: softcap/ALiBi model: LMCache's mask is used")
        return False
    if "fp8" in str(getattr(impl, "kv_cache_dtype", "auto")):
        say_once("fp8", "kvdemo plugin: mask: FP8 KV cache: LMCache's mask is used")
        return False
    return True


PATCHES = ((MOD_ATTN_METADATA, patch_mask_metadata), (MOD_FLASH_ATTN, patch_mask_attention))
