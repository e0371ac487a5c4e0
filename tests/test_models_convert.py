"""kvdemo.models end to end on a tiny synthetic GGUF (torch, transformers and gguf; skipped without them).

A random tiny Qwen2 / Llama model is written as a GGUF the way llama.cpp's converter lays it out (F32 tensors,
GGUF tensor names, Llama's q/k rows permuted, a byte-level BPE tokenizer with a chat template), split into parts,
then joined, verified, converted and loaded back with transformers: its logits must be the original model's.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from kvdemo import models
from kvdemo.models import registry

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ t", "Ġt he"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-6}
ARCHS = {  # GGUF architecture → (transformers config class, rope theta, tied embeddings, gguf pre-tokenizer)
    "qwen2": ("Qwen2Config", 1e6, True, "qwen2"),
    "llama": ("LlamaConfig", 1e4, False, "llama-bpe"),
}


def byte_alphabet() -> list[str]:
    """GPT-2's byte → printable character table, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def vocabulary() -> list[str]:
    return byte_alphabet() + ["".join(m.split(" ")) for m in MERGES] + SPECIALS


def llama_cpp_permute(w, n_head: int):
    """llama.cpp's interleaved-rope row order for q/k (transformers' GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_model(arch: str):
    config_class, theta, tied, _ = ARCHS[arch]
    vocab = vocabulary()
    config = getattr(transformers, config_class)(
        vocab_size=len(vocab), rope_theta=theta, tie_word_embeddings=tied, bos_token_id=vocab.index(SPECIALS[0]),
        eos_token_id=vocab.index(SPECIALS[2]), **SHAPE)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # rounded to bf16, so that the bf16 copy is exact
            noise = torch.randn_like(p) * 0.05
            p.copy_((noise + 1.0 if "norm" in name else noise).to(torch.bfloat16).float())
    return model


def write_gguf(model, arch: str, path: Path) -> None:
    """``model`` as llama.cpp would write it, F32, with the tokenizer and metadata transformers' loader reads."""
    _, theta, tied, pre = ARCHS[arch]
    c = model.config
    vocab = vocabulary()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"Tiny {arch} test model")
    w.add_license("apache-2.0")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "llama":
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in vocab])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(vocab.index(SPECIALS[0]))
    w.add_eos_token_id(vocab.index(SPECIALS[2]))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        data = tensor.numpy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in hf_name else c.num_key_value_heads
            data = llama_cpp_permute(data, heads)
        w.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), data.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def split(data: bytes, n_parts: int) -> tuple[int, list[bytes]]:
    part_size = -(-len(data) // n_parts)
    return part_size, [data[i:i + part_size] for i in range(0, len(data), part_size)]


@pytest.mark.parametrize("arch, as_wheels", [("qwen2", False), ("llama", True)])
def test_tiny_gguf_in_parts_joins_verifies_converts_and_loads(tmp_path: Path, monkeypatch, capsys, arch, as_wheels):
    original = tiny_model(arch)
    source = tmp_path / "tiny.gguf"
    write_gguf(original, arch, source)
    data = source.read_bytes()
    part_size, chunks = split(data, 3)
    entry = registry.PipModel(f"tiny {arch}", f"tiny-{arch}-part{{n}}", "data/part{n:02d}.bin", parts=len(chunks),
                              version="1.0", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                              part_size=part_size, context=512, licence="test")
    monkeypatch.setitem(registry.PIP_MODELS, f"tiny-{arch}", entry)
    parts = tmp_path / "parts"
    parts.mkdir()
    for n, chunk in enumerate(chunks, 1):
        if as_wheels:
            with zipfile.ZipFile(parts / f"{entry.package_of(n)}-1.0-py3-none-any.whl", "w") as z:
                z.writestr(f"{entry.package_of(n)}/{entry.member_of(n)}", chunk)
        else:
            (parts / Path(entry.member_of(n)).name).write_bytes(chunk)

    out = tmp_path / "model"
    assert models.main([f"tiny-{arch}", str(out), "--parts", str(parts)]) == 0
    assert f"SHA-256 {entry.sha256} matches the registry" in capsys.readouterr().out
    assert not list(out.glob("*.gguf"))  # the joined file is not left in the model directory

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded).__name__ == models.CAUSAL_LM_CLASSES[arch]
    assert loaded.config.num_key_value_heads == 2 and loaded.config.max_position_embeddings == 512
    assert loaded.config.tie_word_embeddings is ARCHS[arch][2]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello the"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhello the<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0, 0].item() == vocabulary().index("<|im_start|>")  # a special token stays whole
    assert vocabulary().index("hello") in ids[0].tolist()  # merges applied
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits, atol=1e-4, rtol=1e-4)

    meta = json.loads((out / models.MODEL_META_FILE).read_text())
    assert meta["name"] == f"tiny-{arch}" and meta["model_sha256"] == entry.sha256 and meta["sha256_pinned"]
    assert meta["model_bytes"] == len(data) and meta["model_type"] == arch
    assert meta["source"]["kind"] == ("wheels" if as_wheels else "part files")
    assert meta["source"]["wheels"] == [f"tiny-{arch}-part{n}==1.0" for n in range(1, len(chunks) + 1)]
    assert meta["gguf"]["general.name"] == f"Tiny {arch} test model"
    assert meta["gguf"]["general.license"] == "apache-2.0"
    assert meta["gguf"]["general.architecture"] == arch and meta["gguf"][f"{arch}.block_count"] == 2
    assert meta["gguf"]["tokenizer.chat_template"] == "present"


def test_a_joined_gguf_file_is_converted_in_place(tmp_path: Path, monkeypatch):
    original = tiny_model("qwen2")
    source = tmp_path / "tiny.gguf"
    write_gguf(original, "qwen2", source)
    data = source.read_bytes()
    monkeypatch.setitem(registry.PIP_MODELS, "tiny", registry.PipModel(
        "tiny", "tiny-part{n}", "data/part{n:02d}.bin", parts=2, version="1.0", size=len(data),
        sha256=hashlib.sha256(data).hexdigest(), part_size=-(-len(data) // 2)))
    out = tmp_path / "model"
    assert models.main(["tiny", str(out), "--gguf", str(source)]) == 0
    assert source.is_file()  # the user's file is left alone
    meta = json.loads((out / models.MODEL_META_FILE).read_text())
    assert meta["source"] == {"kind": "gguf file", "files": ["tiny.gguf"]}
    assert transformers.AutoConfig.from_pretrained(out).architectures == ["Qwen2ForCausalLM"]
