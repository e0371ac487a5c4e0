"""The LMCache yaml, parsed once: what the rest of kvdemo needs to know about it.

WHY: LMCache splits a blended prompt on the token ids of its ``blend_special_str``. The app's prompts,
the simulated engine and the offline API must splice in the *same* separator, or 🚀 silently stops reusing
chunks (the app once used a hard-coded separator while the others read the yaml). Everything reads it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .preflight import check_lmcache_config
from .prompts import DEFAULT_SEPARATOR


@dataclass(frozen=True)
class LmcacheConfig:
    """The keys of an LMCache yaml that kvdemo acts on (LMCache's own defaults where a key is absent)."""

    separator: str = DEFAULT_SEPARATOR  # blend_special_str
    blending: bool = False  # enable_blending
    chunk_size: int = 256
    recompute_ratio: float = 0.15  # blend_recompute_ratios[0]
    remote_url: str | None = None
    cpu_cache_gib: float = 5.0  # max_local_cpu_size: the CPU cache uploads share with the shipped chunks
    min_retrieve_tokens: int = 0  # a shorter hit is not loaded: the engine prefills those tokens instead

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> LmcacheConfig:
        ratios = data.get("blend_recompute_ratios") or [cls.recompute_ratio]
        return cls(separator=str(data.get("blend_special_str", DEFAULT_SEPARATOR)),
                   blending=bool(data.get("enable_blending", False)),
                   chunk_size=int(data.get("chunk_size", cls.chunk_size)),
                   recompute_ratio=float(ratios[0]), remote_url=data.get("remote_url"),
                   cpu_cache_gib=float(data.get("max_local_cpu_size", cls.cpu_cache_gib)),
                   min_retrieve_tokens=int(data.get("min_retrieve_tokens", cls.min_retrieve_tokens)))

    @classmethod
    def load(cls, path: Path) -> LmcacheConfig:
        """Parse ``path``; a missing or malformed file is a one-line UserFacingError."""
        return cls.from_mapping(check_lmcache_config(path))
