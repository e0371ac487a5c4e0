"""A GGUF file → a model directory (config, bf16 safetensors, tokenizer) and its provenance file.

torch, transformers and gguf are imported inside the functions: the rest of kvdemo runs without them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserFacingError
from .registry import MODEL_META_FILE

# transformers' model_type (from the GGUF's general.architecture) → the class whose tensors the GGUF holds
CAUSAL_LM_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
MAX_ARRAY_ITEMS = 16  # longer metadata arrays (vocabularies, merges) are left out of the provenance


def _import_stack():
    try:
        import torch
        import transformers
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as exc:
        raise UserFacingError(f"Converting needs torch, transformers and gguf ({exc}): "
                              "`pip install torch transformers gguf`.") from exc
    return torch, transformers, load_gguf_checkpoint


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Writes ``out_dir``: the GGUF's config, its tensors dequantized to bf16 safetensors in the class that
    ``CAUSAL_LM_CLASSES`` names for its architecture, and its tokenizer (chat template included)."""
    torch, transformers, load_gguf_checkpoint = _import_stack()
    folder, name = str(gguf.parent), gguf.name
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    class_name = CAUSAL_LM_CLASSES.get(config.model_type)
    if class_name is None:
        raise UserFacingError(f"{gguf.name} is a {config.model_type!r} model; this converter handles "
                              f"{', '.join(sorted(CAUSAL_LM_CLASSES))}.")
    model = getattr(transformers, class_name)(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    head = [m for m in missing if m.startswith("lm_head.")]
    if unexpected or len(missing) > len(head):
        raise UserFacingError(f"{gguf.name}: tensors do not fit {class_name} (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).")
    if head:  # no output.weight in the file: the head is the token embeddings
        model.config.tie_word_embeddings = True
    model.tie_weights()
    model = model.to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)
    return out_dir


def _field_value(field, value_type):
    def one(index: int, kind):
        part = field.parts[index]
        if kind == value_type.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        return part.tolist()[0]

    if field.types[0] == value_type.ARRAY:
        if len(field.data) > MAX_ARRAY_ITEMS:
            return None
        return [one(i, field.types[-1]) for i in field.data]
    return one(field.data[0], field.types[0])


def gguf_metadata(gguf: Path) -> dict:
    """The GGUF's own description of itself: every ``general.*`` key (name, licence fields where present, …),
    its architecture's hyperparameters (``<arch>.*``) and its tokenizer's kind; values as JSON types."""
    try:
        from gguf import GGUFReader, GGUFValueType
    except ImportError as exc:
        raise UserFacingError(f"Reading GGUF metadata needs the gguf package ({exc}): `pip install gguf`.") from exc
    reader = GGUFReader(str(gguf), "r")
    arch = _field_value(reader.fields["general.architecture"], GGUFValueType)
    kept = ("general.", f"{arch}.", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id")
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith(kept):
            value = _field_value(field, GGUFValueType)
            if value is not None:
                meta[key] = value
    meta["tokenizer.chat_template"] = "present" if "tokenizer.chat_template" in reader.fields else "absent"
    meta["tensor_count"] = len(reader.tensors)
    return meta


def write_provenance(out_dir: Path, record: dict) -> Path:
    """``<out_dir>/kvdemo_model.json``: the record, plus the architecture the directory's config names."""
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    record = {**record, "model_type": config.get("model_type"), "architectures": config.get("architectures"),
              "dtype": "bfloat16"}
    path = out_dir / MODEL_META_FILE
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
