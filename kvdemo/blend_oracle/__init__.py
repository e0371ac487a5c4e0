"""kvdemo.blend_oracle: an exact torch reference of LMCache 0.5.3's CacheBlend (core.py documents it)."""

from .core import (
    ANSWER_TOKENS,
    APPENDED,
    QUALITY_CONTEXT,
    QUESTIONS_FILE,
    TOP_K,
    VARIANTS,
    BlendPrompt,
    ManualLlama,
    StoredKV,
    answer_rows,
    blend,
    blend_layout,
    check_state,
    main,
    paired_differences,
    plan_variants,
    query_limits,
    run_prompt,
    select_top,
    topk_count,
)

__all__ = ["ANSWER_TOKENS", "APPENDED", "QUALITY_CONTEXT", "QUESTIONS_FILE", "TOP_K", "VARIANTS", "BlendPrompt",
           "ManualLlama", "StoredKV", "answer_rows", "blend", "blend_layout", "check_state", "main",
           "paired_differences", "plan_variants", "query_limits", "run_prompt", "select_top", "topk_count"]
