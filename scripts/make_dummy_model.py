"""Make a local model directory with Mistral-7B-Instruct-v0.2's shape and a locally trained tokenizer.

No weights: serve it with `--load-format dummy` (random weights, real compute and memory traffic, so
TTFT and throughput are real; generated text is noise). Needs the `tokenizers` package.

With `--tokenizer-only`, write only the tokenizer files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json), e.g. for kvdemo/assets/sim_tokenizer, which the simulated engines and the
CPU tests load with `transformers.AutoTokenizer.from_pretrained(path)`.

With `--arch qwen2` / `--arch qwen3` the shape is Qwen2.5-0.5B-Instruct's / Qwen3-0.6B's config.json (the
blending check of the architectures LMCache maps itself); the vocabulary is always this tokenizer's.

Usage: python3 make_dummy_model.py OUT_DIR [--arch mistral|llama|qwen2|qwen3] [--vocab 8000] [--tokenizer-only]
"""

import argparse
import json
import math
import os
import pydoc_data.topics
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role']=='user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role']=='assistant' %}"
    "{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
SHAPE: dict[str, Any] = {  # Mistral-7B-Instruct-v0.2
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "attention_dropout": 0.0, "initializer_range": 0.02,
    "use_cache": True,
}
# Real configs' shapes (Hugging Face config.json of Qwen/Qwen2.5-0.5B-Instruct and Qwen/Qwen3-0.6B), minus
# vocabulary and special token ids, which follow the tokenizer trained here.
QWEN_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
              "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "max_position_embeddings": 32768, "max_window_layers": 21,
              "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True,
              "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
              "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
              "max_window_layers": 28, "sliding_window": None, "use_sliding_window": False,
              "tie_word_embeddings": True, "attention_bias": False, "rope_scaling": None,
              "rope_theta": 1000000, "rms_norm_eps": 1e-6},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_tokenizer(vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(pydoc_data.topics.topics.values()) * 3, trainer)
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--arch", choices=["mistral", "llama", *QWEN_SHAPES], default="mistral")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--tokenizer-only", action="store_true",
                    help="write only " + ", ".join(TOKENIZER_FILES))
    a = ap.parse_args()
    tok = train_tokenizer(a.vocab)
    os.makedirs(a.out, exist_ok=True)
    cfg: dict[str, Any] = dict(
        SHAPE, model_type=a.arch, vocab_size=int(math.ceil(tok.get_vocab_size() / 64) * 64),
        architectures=["MistralForCausalLM" if a.arch == "mistral" else "LlamaForCausalLM"])
    if a.arch == "llama":
        cfg.update(rope_scaling=None, attention_bias=False, mlp_bias=False)
    if a.arch in QWEN_SHAPES:
        cfg = {key: value for key, value in cfg.items() if key != "head_dim"}  # Qwen2: hidden / heads
        cfg.update(QWEN_SHAPES[a.arch], hidden_act="silu")
    files: dict[str, dict[str, Any]] = {
        "config.json": cfg,
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                                  "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                                  "add_eos_token": False, "model_max_length": 32768,
                                  "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE},
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2},
    }
    if a.tokenizer_only:
        files = {name: obj for name, obj in files.items() if name in TOKENIZER_FILES}
    for name, obj in files.items():
        with open(os.path.join(a.out, name), "w") as f:
            json.dump(obj, f, indent=1)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    if a.tokenizer_only:
        print(f"{a.out}: tokenizer only, vocab {tok.get_vocab_size()}")
    else:
        print(f"{a.out}: {cfg['architectures'][0]}, vocab {cfg['vocab_size']}")


if __name__ == "__main__":
    main()
