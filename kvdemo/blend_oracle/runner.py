"""The whole run: the model, the harness's prompts, every prompt × variant, the JSON written to ``--out``."""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

from .. import quality as qm
from ..revision import source_revision
from .core import StoredKV
from .evaluate import run_prompt
from .layout import BlendPrompt, harness_prompts
from .llama import ManualLlama
from .metrics import engine_numbers, paired_differences, per_prompt, print_table, summarize
from .settings import TOP_K
from .variants import describe, plan_variants


def load_model(model_dir: str, device: str, dtype: str):
    """HF LlamaForCausalLM in ``dtype`` on ``device`` (eval, no grad), and its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    # .to() rather than from_pretrained's dtype argument (torch_dtype before transformers 4.56): any version.
    return model.to(device=device, dtype=getattr(torch, dtype)).eval(), AutoTokenizer.from_pretrained(model_dir)


def hf_consistency(model, llama: ManualLlama, prompt: BlendPrompt) -> float:
    """Max |log-prob| difference of the manual forward against HF's own forward (last position): the
    manual forward is what every variant is built from."""
    import torch

    ids = torch.tensor([prompt.ids], device=llama.device)
    hf = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
    ours = torch.log_softmax(llama.forward(ids, llama.new_cache(1, len(prompt.ids)))[0], dim=-1)
    return float((hf - ours).abs().max())


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def check_layers(config_path: Path) -> int:
    """The (single) blend check layer of the LMCache yaml the engines use."""
    from ..preflight import check_lmcache_config

    layers = check_lmcache_config(config_path).get("blend_check_layers") or [1]
    if len(layers) != 1:
        raise ValueError(f"{config_path}: one blend_check_layers entry expected (LMCache 0.5.3 uses one), got {layers}")
    return int(layers[0])


def run(a: argparse.Namespace, argv_text: str, log: Callable[[str], None] = print) -> dict:
    """Every prompt × variant; returns the JSON written to ``a.out``."""
    import torch

    torch.set_grad_enabled(False)
    t0 = time.monotonic()
    ratios = [float(x) for x in a.ratios.split(",")]
    kinds = [k.strip() for k in a.variants.split(",") if k.strip()]
    variants = plan_variants(ratios, kinds)
    check = check_layers(Path(a.lmcache_config))
    model, tokenizer = load_model(a.model, a.device, a.dtype)
    llama = ManualLlama(model)
    prompts = harness_prompts(tokenizer, a.prompts, seed=a.seed, lmcache_config=Path(a.lmcache_config),
                              context_target=a.context_target, max_model_len=a.max_model_len)
    stored = StoredKV(llama)
    hf_diff = hf_consistency(model, llama, prompts[0]) if a.hf_check else None
    outcomes = []
    for n, p in enumerate(prompts, 1):
        t = time.monotonic()
        o = run_prompt(llama, stored, p, variants, check, a.answer_tokens, a.rows)
        outcomes.append(o)
        kls = " ".join(f"{k}={r.first_token_kl:.4f}" for k, r in o.results.items())
        log(f"kvdemo.blend_oracle: prompt {n}/{len(prompts)} ({o.tokens} tokens, {time.monotonic() - t:.0f} s) {kls}")
    prompt_rows = [{"prompt": o.label, "tokens": o.tokens, "blend_tokens": o.blend_len,
                    "first_token_kl": {k: r.first_token_kl for k, r in o.results.items()},
                    "first_token_kl_partial_topk": {k: r.first_token_kl_partial_topk for k, r in o.results.items()},
                    "agree_prefix": {k: r.agree_prefix for k, r in o.results.items()},
                    "recomputed_tokens": dict(o.selected)} for o in outcomes]
    boot = qm.Bootstrap(draws=a.bootstrap_draws, seed=a.bootstrap_seed)
    result = {
        "what": "exact torch reference of LMCache 0.5.3 CacheBlend vs full prefill (kvdemo.blend_oracle)",
        "device": device_name(a.device), "dtype": a.dtype, "versions": versions(), **source_revision(),
        "model": a.model,
        "weights": "real (the model dir's own weights; SmolLM2-135M-Instruct for the committed runs)",
        "command": "python -m kvdemo.blend_oracle " + argv_text, "n_prompts": len(prompts),
        "check_layer": check, "variant_kinds": {k: describe(k) for k in kinds},
        "answer_tokens": a.answer_tokens, "answers_stop_at_eos": False, "top_k": TOP_K,
        "bootstrap": boot.as_json(),
        "context_tokens": {"min": min(o.tokens for o in outcomes), "max": max(o.tokens for o in outcomes)},
        "self_check": {
            "manual_forward_vs_hf_max_abs_logprob": hf_diff,
            "question_path_vs_full_prefill_max_abs_logprob": max(
                o.self_check["question_path_vs_full_prefill_max_abs_logprob"] for o in outcomes)},
        "variants": summarize(outcomes, variants, boot),
        "paired_vs_exact": paired_differences(prompt_rows, variants, boot),
        "prompts": prompt_rows,
        "per_prompt": per_prompt(outcomes, variants),
        "engine_for_comparison": engine_numbers(),
        "wall_s": time.monotonic() - t0,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"kvdemo.blend_oracle: wrote {out}")
    print_table(result, log)
    return result
