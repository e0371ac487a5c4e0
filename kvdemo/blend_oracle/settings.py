"""The oracle's settings: the quality harness's, copied so that prompt i here is the harness's prompt i."""

from __future__ import annotations

from ..config import REPO_ROOT

DEFAULT_RATIOS = "0,0.02,0.15,0.3,0.5,1.0"
VARIANTS = ("exact", "bottom_right", "gaps", "oracle")
# The harness's settings (kvdemo.bench.quality: TOP_K, ANSWER_TOKENS, APPENDED, QUESTIONS_FILE, the defaults
# --quality-context 4000,7000 and --seed 0, and the --max-model-len 8192 of scripts/gpu_run.sh's quality step),
# so that prompt i is the harness's prompt i. Copied, not imported: kvdemo.bench pulls in the engines' HTTP
# stack, which a bare GPU machine lacks; tests/test_blend_oracle.py checks they still agree.
TOP_K = 20
ANSWER_TOKENS = 32
APPENDED = (8, 16, 32)
QUESTIONS_FILE = REPO_ROOT / "data" / "quality_questions.jsonl"
QUALITY_CONTEXT = (4000, 7000)
MAX_MODEL_LEN = 8192
BLEND_CONFIG = REPO_ROOT / "lmcache_configs" / "blend.yaml"
