"""An independent, exact reference of LMCache 0.5.3's CacheBlend in plain torch, on the quality harness's prompts.

    python -m kvdemo.blend_oracle --model DIR [--device cpu|cuda] [--dtype float32|bfloat16] [--prompts N]
        [--ratios 0,0.02,0.15,0.3,0.5,1.0] [--variants exact,bottom_right,gaps,oracle,...] --out FILE.json

WHY: to tell whether blended answers that drift from the full prefill are what CacheBlend itself computes or
something else the engine computes. This package computes the algorithm layer by layer with the HF model's own
modules (no vLLM, no LMCache, no FlashAttention), on the same token ids, and scores it with the harness's own
metrics (kvdemo.quality), so its numbers can be laid next to the engine's.

Variants computed here (per ratio; all share the prompt's full prefill, stored KV and the layers before the
check layer). The defaults:

* ``exact``: LMCache's selection and zero gaps, the exact causal mask (the engine with all kvdemo fixes);
* ``bottom_right``: the same with LMCache's own bottom-right mask (the engine with ``all,-mask``);
* ``gaps``: separators kept, by recomputing them: ``exact`` + the gap (SEP) tokens always recomputed and never
  zero (layer 0 included), on top of the budget; isolates LMCache's gap zeroing;
* ``oracle``: ``exact`` infrastructure, but the recomputed tokens are the ones whose loaded KV deviates most
  from the full prefill's (K and V, summed over layers, each layer normalised by its mean squared KV norm):
  the best this recompute budget can do with a better selection rule.

Recompute policies to measure against ``exact`` (``--variants``; variants.py says what each changes,
docs/recompute-policies.md how to read them):

* ``sep_stored``: separators kept at no cost: each gap loaded with the KV the following chunk's stored request
  computed for it (``[BOS]+SEP+chunk``), not zeroed; LMCache's selection;
* ``epic<K>`` (``epic8``, ``epic16``, ``epic32``): the first K tokens of every chunk, then the K-deviation top
  ``budget - |first|`` of the rest (kvdemo.lmcache_patches.selection, the plugin's ``epic:K``); at ratio 0
  (budget 0) the first K tokens alone;
* ``per_chunk``: the budget split over the chunks by length, K-deviation top-k within each (``per_chunk``);
* ``check<L>``: LMCache's rule with the K deviation measured at layer L (layers before it computed for every
  token, their KV left as loaded, as LMCache does at its check layer);
* ``question``, ``question_dev``: the attention the trailing SEP + question pay each token at the check layer
  (core.question_attention: the question through the layers up to the check layer only), alone or times
  the K deviation; an oracle-only score (the engine's blend does not see the question).

Each row reports its cost: tokens recomputed from the check layer on (``mean_recomputed_tokens``, per prompt
in ``prompts[i].recomputed_tokens``), and the token-layers computed over a full prefill's
(``mean_recompute_layer_fraction``: all tokens in the layers before the check layer).

Ratio 0 is not an LMCache setting (0.5.3 would pick one token): here it means no token is recomputed from the
check layer on. At ratio 1.0 every variant selects all ``T`` tokens (masks coincide), so only ``exact`` and
``gaps`` are computed; ``gaps`` at 1.0 must equal the full prefill (the oracle's self-check), ``exact`` at
1.0 differs from it only through the zero gaps at layer 0.

Metrics (kvdemo.quality, as the engine harness): first-token KL of the full prefill's and the variant's
distributions coarsened to the full prefill's top-20 tokens plus a rest bucket (and the former partial top-20
sum, labelled), identical prefix of ``ANSWER_TOKENS`` greedy tokens decoded past any end-of-sequence token (the
engine harness's requests set ``ignore_eos``), per-prompt values, bootstrap intervals over prompts and paired
ones for each variant minus ``exact``. Prompts: the harness's (kvdemo.quality.sample_prompts with its seed,
default context band and budget), so prompt i here is prompt i of ``python -m kvdemo.bench --quality``. The
settings both share are kvdemo.quality's, imported. torch and transformers are imported inside the functions
that use them (CI has no torch).

The full prefill and each stored chunk are computed once per prompt and shared by all variants; answers of up
to ``--rows`` variants decode as one batch.

The steps, one module each: settings.py (the harness's settings), layout.py (the harness's prompts as LMCache
blends them), llama.py (the HF Llama forward written out module by module), core.py (stored KV, loading, the
check layer, the selections, masks and the blend: what LMCache 0.5.3 does, documented there), variants.py (the
variants per ratio), evaluate.py (one prompt: full prefill, every variant's blend, answers scored),
metrics.py (aggregation over prompts, paired differences, the table), runner.py (the whole run and its JSON),
cli.py (the flags). Each module imports the ones it builds on, never this package's face: these re-exports
are for callers outside the package.
"""

from .cli import build_parser, main
from .core import (
    CheckState,
    Loaded,
    StoredKV,
    blend,
    check_state,
    oracle_score,
    query_limits,
    question_attention,
    recompute_layer_fraction,
    select_top,
    topk_count,
)
from .evaluate import PromptOutcome, answer_rows, run_prompt, top_logprobs
from .layout import BlendPrompt, Segment, blend_layout, harness_prompts
from .llama import KVCache, ManualLlama
from .metrics import engine_numbers, paired_differences, per_prompt, print_table, summarize
from .runner import check_layers, device_name, hf_consistency, load_model, run, versions
from .settings import (
    ANSWER_TOKENS,
    APPENDED,
    BLEND_CONFIG,
    DEFAULT_RATIOS,
    MAX_MODEL_LEN,
    QUALITY_CONTEXT,
    QUESTIONS_FILE,
    TOP_K,
    VARIANTS,
)
from .variants import KINDS, Variant, describe, plan_variants

__all__ = [
    "ANSWER_TOKENS", "APPENDED", "BLEND_CONFIG", "DEFAULT_RATIOS", "KINDS", "MAX_MODEL_LEN", "QUALITY_CONTEXT",
    "QUESTIONS_FILE", "TOP_K", "VARIANTS", "BlendPrompt", "CheckState", "KVCache", "Loaded", "ManualLlama",
    "PromptOutcome", "Segment", "StoredKV", "Variant", "answer_rows", "blend", "blend_layout", "build_parser",
    "check_layers", "check_state", "describe", "device_name", "engine_numbers", "harness_prompts", "hf_consistency",
    "load_model", "main", "oracle_score", "paired_differences", "per_prompt", "plan_variants", "print_table", "query_limits",
    "question_attention", "recompute_layer_fraction", "run", "run_prompt", "select_top", "summarize", "top_logprobs", "topk_count", "versions",
]
