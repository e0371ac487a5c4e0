"""The oracle's settings; the quality harness's own come from kvdemo.quality, so prompt i here is its prompt i."""

from __future__ import annotations

from ..config import REPO_ROOT
from ..quality import ANSWER_TOKENS, APPENDED, QUESTIONS_FILE, TOP_K
from ..quality import DEFAULT_QUALITY_CONTEXT as QUALITY_CONTEXT

DEFAULT_RATIOS = "0,0.02,0.15,0.3,0.5,1.0"
VARIANTS = ("exact", "bottom_right", "gaps", "oracle")
MAX_MODEL_LEN = 8192  # the --max-model-len of scripts/gpu_run.sh's quality step (it bounds the prompts)
BLEND_CONFIG = REPO_ROOT / "lmcache_configs" / "blend.yaml"

__all__ = ["ANSWER_TOKENS", "APPENDED", "BLEND_CONFIG", "DEFAULT_RATIOS", "MAX_MODEL_LEN",
           "QUALITY_CONTEXT", "QUESTIONS_FILE", "TOP_K", "VARIANTS"]
