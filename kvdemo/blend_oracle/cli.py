"""An independent, exact reference of LMCache 0.5.3's CacheBlend in plain torch, on the quality harness's prompts.

    python -m kvdemo.blend_oracle --model DIR [--device cpu|cuda] [--dtype float32|bfloat16] [--prompts N]
        [--ratios 0,0.02,0.15,0.3,0.5,1.0] [--variants exact,bottom_right,gaps,oracle,...] --out FILE.json

The flags of ``python -m kvdemo.blend_oracle`` (the package docstring says what it computes).
"""

from __future__ import annotations

import argparse
import sys

from ..quality import BOOTSTRAP_DRAWS, BOOTSTRAP_SEED
from .runner import run
from .settings import ANSWER_TOKENS, BLEND_CONFIG, DEFAULT_RATIOS, MAX_MODEL_LEN, VARIANTS
from .variants import plan_variants


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvdemo.blend_oracle", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF Llama model dir (python -m kvdemo.models smollm2 DIR)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--prompts", type=int, default=6, help="the harness's first N prompts")
    p.add_argument("--context-target", type=int, default=None,
                   help="the harness's prompts of this --quality-contexts size (default: its default band)")
    p.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN,
                   help="the harness run's --max-model-len (it bounds the prompts)")
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help="recompute ratios (0 = nothing after the check layer)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"variant keys: {','.join(VARIANTS)} (the default), sep_stored, epic<K> (epic8, "
                        "epic16, ...), per_chunk, check<L> (check2, ...), question, question_dev "
                        "(docs/recompute-policies.md)")
    p.add_argument("--answer-tokens", type=int, default=ANSWER_TOKENS, help="greedy tokens per answer")
    p.add_argument("--rows", type=int, default=8, help="answers decoded per batch (memory: ~T*L*KV per row)")
    p.add_argument("--seed", type=int, default=0, help="the harness's prompt sampling seed")
    p.add_argument("--bootstrap-draws", type=int, default=BOOTSTRAP_DRAWS, help="bootstrap resamples of the prompts")
    p.add_argument("--bootstrap-seed", type=int, default=BOOTSTRAP_SEED, help="bootstrap seed")
    p.add_argument("--lmcache-config", default=str(BLEND_CONFIG), help="LMCache yaml (check layer, separator)")
    p.add_argument("--no-hf-check", dest="hf_check", action="store_false",
                   help="skip comparing the manual forward with HF's on prompt 1")
    p.add_argument("--out", required=True, help="JSON to write")
    return p


def main(argv: list[str] | None = None) -> int:
    import shlex

    a = build_parser().parse_args(argv)
    if a.prompts < 1:
        print("kvdemo.blend_oracle: --prompts must be at least 1", file=sys.stderr)
        return 2
    try:
        plan_variants([0.5], [k.strip() for k in a.variants.split(",") if k.strip()])
    except ValueError as exc:
        print(f"kvdemo.blend_oracle: --variants: {exc}", file=sys.stderr)
        return 2
    run(a, shlex.join(sys.argv[1:] if argv is None else argv), log=lambda s: print(s, flush=True))
    return 0
