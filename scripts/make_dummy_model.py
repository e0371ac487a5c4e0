"""Make a local model directory with Mistral-7B-Instruct-v0.2's shape and a locally trained tokenizer.

No weights: serve it with `--load-format dummy` (random weights, real compute and memory traffic, so
TTFT and throughput are real; generated text is noise). Needs the `tokenizers` package.

With `--tokenizer-only`, write only the tokenizer files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json), e.g. for kvdemo/assets/sim_tokenizer, which the simulated engines and the
CPU tests load with `transformers.AutoTokenizer.from_pretrained(path)`.

Usage: python3 make_dummy_model.py OUT_DIR [--arch mistral|llama] [--vocab 8000] [--tokenizer-only]
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
    ap.add_argument("--arch", choices=["mistral", "llama"], default="mistral")
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
