"""An independent, exact reference of LMCache 0.5.3's CacheBlend in plain torch, on the quality harness's prompts.

    python -m kvdemo.blend_oracle --model DIR [--device cpu|cuda] [--dtype float32|bfloat16] [--prompts N]
        [--ratios 0,0.02,0.15,0.3,0.5,1.0] [--variants exact,bottom_right,gaps,oracle] --out FILE.json

WHY (issue #19): blended answers of SmolLM2-135M drift from the full prefill at low recompute ratios (first-token
KL 0.032 at ratio 0.15 with the exact mask, 0.0055 at 1.0). Either that is what CacheBlend does on this model
(the ~85 % reused tokens keep KV computed without attention to the chunks before them), or the engine computes
something else than the algorithm. This module computes the algorithm itself, layer by layer with the HF
model's own modules (no vLLM, no LMCache, no FlashAttention), on the same token ids, and scores it with the
harness's own metric (kvdemo.quality), so its numbers can be laid next to the engine's.

What LMCache 0.5.3 does (read from its source; reproduced here):

* Storing (kvdemo.prompts / kvdemo.precompute): ``[BOS]+sys`` and ``[BOS]+SEP+chunk`` are prefilled on their
  own. LMCache's SegmentTokenDatabase splits on SEP's ids and keys each *segment* (``[BOS]+sys``, ``chunk``)
  by its own ids; it stores the segment's post-RoPE K and V of every layer, computed in the context of its
  precompute request (a chunk at positions ``1+len(SEP) ..``), with those positions
  (gpu_connectors.VLLMBufferLayerwiseGPUConnector.batched_from_gpu ``cached_positions``).
* Lookup (cache_engine.lookup): the hit is the prefix up to the end of the last stored segment, i.e. through
  the last chunk. These ``T`` tokens are blended; the trailing SEP and the question are prefilled by vLLM
  over the blended KV.
* Loading (batched_to_gpu): per layer the stored K is re-rotated from its stored positions to its new ones
  (FusedRope: a rotation by ``new - old``), V is copied; the SEP tokens between segments ("gaps") are
  stored nowhere and their K and V are set to **zero** after the re-rotation.
* Blending (blend/blender.py ``process_qkv``, models/base.py ``compute_layer``), layer by layer over the
  ``T`` tokens, positions ``0..T-1``:
  - layers before the check layer (``blend_check_layers: [1]`` → layer 0 only) are recomputed for all
    tokens (fresh Q/K/V, full causal attention), but the KV they leave in vLLM's cache is the *loaded* one
    (re-rotated stored KV, zero gaps): ``old_k[imp_indices] = k`` only runs once tokens are selected;
  - at the check layer the fresh K of all ``T`` tokens (post-RoPE, from the recomputed hidden states) is
    compared with the loaded K: ``diff = sum((k - old_k)**2)`` in fp32 over all KV heads and head dims
    (K only, no V, no normalisation; gaps compare against zero). ``topk_num = max(int(T * ratio), 1)``
    tokens with the largest ``diff`` are taken (``torch.topk``, then sorted by position), counted over all
    ``T`` blended tokens (system prompt and gaps included), nothing is always included;
  - from the check layer on (the check layer itself included) only those tokens are computed: their
    fresh K/V overwrite the loaded ones, and they attend over the ``T`` keys (loaded, with the selected
    rows replaced). LMCache's FlashAttention call is causal with ``k`` queries and ``T`` keys, aligned
    bottom-right: selected query ``i`` sees keys ``0 .. T-k+i``; kvdemo's ``mask`` fix gives it
    ``0 .. p_i`` (its true position). Only ``blend_recompute_ratios[0]`` and one check layer are used.
  - the trailing SEP + question are then computed normally (causal, true positions) over that cache.

Variants computed here (per ratio; all share the prompt's full prefill, stored KV and the layers before the
check layer):

* ``exact``: LMCache's selection and zero gaps, the exact causal mask (the engine with all kvdemo fixes);
* ``bottom_right``: the same with LMCache's own bottom-right mask (the engine with ``all,-mask``);
* ``gaps``: ``exact`` + the gap (SEP) tokens always recomputed and never zero (layer 0 included): what a
  blender that keeps the separators' KV would give; isolates LMCache's gap zeroing;
* ``oracle``: ``exact`` infrastructure, but the recomputed tokens are the ones whose loaded KV deviates most
  from the full prefill's (K and V, summed over layers, each layer normalised by its mean squared KV norm):
  the best this recompute budget can do with a better selection rule.

Ratio 0 is not an LMCache setting (0.5.3 would pick one token): here it means no token is recomputed from the
check layer on. At ratio 1.0 every variant selects all ``T`` tokens (masks coincide), so only ``exact`` and
``gaps`` are computed; ``gaps`` at 1.0 must equal the full prefill (the module's self-check), ``exact`` at
1.0 differs from it only through the zero gaps at layer 0.

Metrics (kvdemo.quality, as the engine harness): first-token KL over the full prefill's top-20 raw log-probs
(both sides top-20), identical prefix of 32 greedy tokens, 95 % bootstrap intervals over prompts. Prompts:
the harness's (kvdemo.quality.sample_prompts with its seed, context bounds and token overhead), so prompt i
here is prompt i of ``python -m kvdemo.bench --quality``. torch and transformers are imported inside the
functions that use them (CI has no torch).

Cost: the full prefill and each stored chunk are computed once per prompt and shared by all variants, answers
of up to ``--rows`` variants decode as one batch. 40 prompts × 20 variants took ~135 s on an H200 (fp32) and
6 prompts ~40 min on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import quality as qm
from ..config import REPO_ROOT

DEFAULT_RATIOS = "0,0.02,0.15,0.3,0.5,1.0"
VARIANTS = ("exact", "bottom_right", "gaps", "oracle")
# The harness's settings (kvdemo.bench.quality: TOP_K, ANSWER_TOKENS, APPENDED, QUESTIONS_FILE, the defaults
# --quality-context 4000,7000 and --seed 0, and the --max-model-len 8192 of scripts/gpu_run.sh's quality step),
# so that prompt i is the harness's prompt i. Copied, not imported: kvdemo.bench pulls in the engines' HTTP
# stack, which a bare GPU machine lacks; tests/test_blend_oracle.py checks they still agree.
TOP_K = 20
ANSWER_TOKENS = 32
APPENDED = (8, 16, 32)
QUESTIONS_FILE = REPO_ROOT / "data" / "quality_questions.jsonl"
QUALITY_CONTEXT = (4000, 7000)
MAX_MODEL_LEN = 8192
BLEND_CONFIG = REPO_ROOT / "lmcache_configs" / "blend.yaml"


# --------------------------------------------------------------------------------------------------
# Token layout: what is blended, what was stored, where the gaps are
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One stored segment: where it sits in the prompt and the precompute request that stored its KV."""

    start: int  # first prompt position
    length: int
    stored: tuple[int, ...]  # ids of the precompute request ([BOS]+sys or [BOS]+SEP+chunk)
    offset: int  # first position of the segment inside `stored` (its stored RoPE position)


@dataclass(frozen=True)
class BlendPrompt:
    """A prompt as LMCache blends it: ``ids[:blend_len]`` from stored segments and gaps, the rest prefilled."""

    ids: tuple[int, ...]
    blend_len: int
    segments: tuple[Segment, ...]
    gaps: tuple[int, ...]  # prompt positions of separator tokens inside the blended part
    label: str = ""


def blend_layout(bos: Sequence[int], sys_ids: Sequence[int], chunks: Sequence[Sequence[int]], sep: Sequence[int],
                 question: Sequence[int], label: str = "") -> BlendPrompt:
    """``[BOS]+sys + (SEP+chunk)* + SEP+question`` with the segments LMCache's lookup hits (all but the question).

    The stored requests are kvdemo.prompts.PromptBuilder.precompute_layout's: ``[BOS]+sys`` (segment at 0)
    and ``[BOS]+SEP+chunk`` (segment at ``len(BOS)+len(SEP)``).
    """
    ids = list(bos) + list(sys_ids)
    segments = [Segment(0, len(ids), tuple(ids), 0)]
    gaps: list[int] = []
    for chunk in chunks:
        gaps += range(len(ids), len(ids) + len(sep))
        ids += sep
        segments.append(Segment(len(ids), len(chunk), tuple(bos) + tuple(sep) + tuple(chunk), len(bos) + len(sep)))
        ids += chunk
    blend_len = len(ids)
    ids += list(sep) + list(question)
    return BlendPrompt(tuple(ids), blend_len, tuple(segments), tuple(gaps), label)


def harness_prompts(tokenizer, n: int, seed: int = 0, questions: Path = QUESTIONS_FILE,
                    data_dir: Path = REPO_ROOT / "data", lmcache_config: Path = BLEND_CONFIG) -> list[BlendPrompt]:
    """The quality harness's first n prompts (same sampling, seed and bounds as kvdemo.bench.quality.run_quality)."""
    from ..lmcache_config import LmcacheConfig
    from ..prompts import ChunkLibrary, PromptBuilder

    library = ChunkLibrary.load(data_dir)
    builder = PromptBuilder(tokenizer, library, separator=LmcacheConfig.load(lmcache_config).separator)
    qs = qm.load_questions(questions, list(library.chunks))
    sep = len(builder.sep_ids)
    chunk_tokens = {c: len(builder.chunk_ids(c)) + sep for c in library.chunks}
    fixed = len(builder.bos_ids) + len(builder.sys_ids()) + sep + 40  # as run_quality: + the question, about
    budget = MAX_MODEL_LEN - ANSWER_TOKENS - max(APPENDED) - 64
    sampled = qm.sample_prompts(qs, chunk_tokens, fixed, n, QUALITY_CONTEXT[0], min(QUALITY_CONTEXT[1], budget),
                                seed=seed)
    out = []
    for p in sampled:
        bp = blend_layout(builder.bos_ids, builder.sys_ids(), [builder.chunk_ids(c) for c in p.chunks],
                          builder.sep_ids, builder.question_ids(p.question.question),
                          label=f"{p.question.qid}: {' + '.join(p.chunks)}")
        if list(bp.ids) != builder.build(list(p.chunks), p.question.question):
            raise AssertionError("blend_layout disagrees with PromptBuilder.build")
        stored = builder.precompute_layout(builder.sys_ids(), [builder.chunk_ids(c) for c in p.chunks])
        if [list(s.stored) for s in bp.segments] != stored:
            raise AssertionError("blend_layout disagrees with PromptBuilder.precompute_layout")
        out.append(bp)
    return out


# --------------------------------------------------------------------------------------------------
# The model, one module at a time
# --------------------------------------------------------------------------------------------------


class KVCache:
    """Per-layer K (post-RoPE) and V of B sequences, preallocated so decoding never copies the whole cache."""

    def __init__(self, n_layers: int, batch: int, capacity: int, n_kv: int, head_dim: int, dtype, device) -> None:
        import torch

        shape = (batch, capacity, n_kv, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0


class ManualLlama:
    """A Llama forward written out with the HF model's modules, so each layer's KV can be swapped (blending)."""

    def __init__(self, model) -> None:
        inner = model.model
        cfg = model.config
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError("only plain RoPE (as LMCache's blending supports)")
        self.model = model
        self.layers = list(inner.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(len(self.layers), batch, capacity, self.n_kv, self.head_dim, self.dtype, self.device)

    def positions(self, start: int, end: int):
        import torch

        return torch.arange(start, end, device=self.device)

    def rope(self, x, positions):
        """RoPE of ``x [..., L, H, d]`` at ``positions [L]`` (HF's rotary embedding; may be negative: re-rotation)."""
        import torch

        cos, sin = self.model.model.rotary_emb(x, positions[None].to(torch.float32))
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def embed(self, ids):
        return self.model.model.embed_tokens(ids)

    def qkv(self, layer, h, positions):
        """``h [B, L, D]`` → post-RoPE ``q [B, L, Hq, d]``, ``k [B, L, Hkv, d]`` and ``v``."""
        a = layer.self_attn
        x = layer.input_layernorm(h)
        b, n = x.shape[:2]
        q = a.q_proj(x).view(b, n, self.n_heads, self.head_dim)
        k = a.k_proj(x).view(b, n, self.n_kv, self.head_dim)
        v = a.v_proj(x).view(b, n, self.n_kv, self.head_dim)
        return self.rope(q, positions), self.rope(k, positions), v

    def attend(self, layer, q, k, v, allowed=None):
        """Attention output after o_proj; ``allowed [Lq, Lk]`` (True: visible) or None for the square causal mask."""
        import torch.nn.functional as F

        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=allowed, is_causal=allowed is None,
                                             scale=layer.self_attn.scaling, enable_gqa=True)
        return layer.self_attn.o_proj(out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1))

    @staticmethod
    def finish(layer, h, attn_out):
        """Residual add, post-attention norm, MLP, residual add (vLLM's fused add-norm computes the same)."""
        h = h + attn_out
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, h):
        return self.model.lm_head(self.model.model.norm(h))

    def forward(self, ids, cache: KVCache):
        """Causal prefill/decode of ``ids [B, L]`` after ``cache.length`` cached tokens; returns last logits."""
        import torch

        n = ids.shape[1]
        start = cache.length
        pos = self.positions(start, start + n)
        h = self.embed(ids)
        allowed = None
        if start:
            allowed = torch.arange(start + n, device=self.device)[None, :] <= pos[:, None]
        for i, layer in enumerate(self.layers):
            q, k, v = self.qkv(layer, h, pos)
            cache.k[i][:, start:start + n] = k
            cache.v[i][:, start:start + n] = v
            h = self.finish(layer, h, self.attend(layer, q, cache.k[i][:, :start + n], cache.v[i][:, :start + n],
                                                  allowed))
        cache.length = start + n
        return self.logits(h[:, -1]).float()


# --------------------------------------------------------------------------------------------------
# Stored KV, loading, blending
# --------------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """Per-layer KV of the blended tokens as LMCache loads it: stored KV re-rotated to the new positions, gaps 0."""

    k: list[Any]  # [T, Hkv, d] per layer
    v: list[Any]


class StoredKV:
    """Each precompute request prefilled once (cached across prompts), as LMCache stores its segment."""

    def __init__(self, llama: ManualLlama) -> None:
        self.llama = llama
        self._done: dict[tuple[int, ...], tuple[list[Any], list[Any]]] = {}

    def request(self, stored: tuple[int, ...]) -> tuple[list[Any], list[Any]]:
        """Per-layer post-RoPE K and V ``[len(stored), Hkv, d]`` of one precompute request."""
        import torch

        if stored not in self._done:
            cache = self.llama.new_cache(1, len(stored))
            self.llama.forward(torch.tensor([stored], device=self.llama.device), cache)
            self._done[stored] = ([k[0] for k in cache.k], [v[0] for v in cache.v])
        return self._done[stored]

    def load(self, prompt: BlendPrompt) -> Loaded:
        """LMCache's batched_to_gpu: segment KV at new positions (rotation by ``new - old``), gap rows zero."""
        import torch

        llama = self.llama
        shape = (prompt.blend_len, llama.n_kv, llama.head_dim)
        ks = [torch.zeros(shape, dtype=llama.dtype, device=llama.device) for _ in llama.layers]
        vs = [torch.zeros(shape, dtype=llama.dtype, device=llama.device) for _ in llama.layers]
        for seg in prompt.segments:
            k_all, v_all = self.request(seg.stored)
            delta = llama.positions(seg.start - seg.offset, seg.start - seg.offset + 1).expand(seg.length)
            for i in range(len(llama.layers)):
                ks[i][seg.start:seg.start + seg.length] = llama.rope(k_all[i][seg.offset:seg.offset + seg.length],
                                                                     delta)
                vs[i][seg.start:seg.start + seg.length] = v_all[i][seg.offset:seg.offset + seg.length]
        return Loaded(ks, vs)


@dataclass
class CheckState:
    """What every variant of a prompt shares: the layers before the check layer and the check layer's fresh QKV."""

    fresh_k: list[Any]  # layers < check: fresh K [T, Hkv, d] (the blend's own attention uses them)
    fresh_v: list[Any]
    h: Any  # [1, T, D] hidden states entering the check layer
    q: Any  # check layer's fresh q/k/v of all T tokens
    k: Any
    v: Any
    k_deviation: Any  # [T] LMCache's sum((k - old_k)**2) in fp32


def check_state(llama: ManualLlama, ids, loaded: Loaded, check_layer: int) -> CheckState:
    """Layers ``< check_layer`` recomputed for all T tokens; the check layer's QKV and LMCache's K deviation."""
    import torch

    pos = llama.positions(0, ids.shape[1])
    h = llama.embed(ids)
    fresh_k, fresh_v = [], []
    for layer in llama.layers[:check_layer]:
        q, k, v = llama.qkv(layer, h, pos)
        fresh_k.append(k[0])
        fresh_v.append(v[0])
        h = llama.finish(layer, h, llama.attend(layer, q, k, v))
    q, k, v = llama.qkv(llama.layers[check_layer], h, pos)
    diff = ((k[0].to(torch.float32) - loaded.k[check_layer].to(torch.float32)) ** 2).flatten(1).sum(dim=1)
    return CheckState(fresh_k, fresh_v, h, q, k, v, diff)


def topk_count(n_tokens: int, ratio: float) -> int:
    """LMCache 0.5.3: ``max(int(T * ratio), 1)``; ratio 0 (not an LMCache setting) recomputes nothing."""
    return 0 if ratio <= 0 else max(int(n_tokens * ratio), 1)


def select_top(score, count: int):
    """The ``count`` largest scores' indices, sorted by position (LMCache: torch.topk, then torch.sort)."""
    import torch

    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    return torch.sort(torch.topk(score, k=count).indices).values


def query_limits(selected, n_keys: int, mask: str):
    """Last visible key per recomputed query: its position (exact) or ``T-k+i`` (FlashAttention bottom-right)."""
    import torch

    if mask == "exact":
        return selected
    if mask == "bottom_right":
        k = selected.shape[0]
        return torch.arange(n_keys - k, n_keys, device=selected.device)
    raise ValueError(f"unknown mask {mask!r}")


def blend(llama: ManualLlama, loaded: Loaded, state: CheckState, selected, mask: str, check_layer: int,
          fresh_gaps=None) -> tuple[list[Any], list[Any]]:
    """Per-layer KV of the T blended tokens left for the question, as LMCache's layerwise blend leaves it.

    ``selected``: sorted positions recomputed from the check layer on. ``fresh_gaps`` (positions): give
    those rows their fresh KV in the layers before the check layer too (the ``gaps`` variant; LMCache
    leaves the loaded, zeroed rows there).
    """
    import torch

    ks, vs = [], []
    for i in range(check_layer):
        k, v = loaded.k[i].clone(), loaded.v[i].clone()
        if fresh_gaps is not None and fresh_gaps.numel():
            k[fresh_gaps], v[fresh_gaps] = state.fresh_k[i][fresh_gaps], state.fresh_v[i][fresh_gaps]
        ks.append(k)
        vs.append(v)
    n_keys = loaded.k[0].shape[0]
    allowed = torch.arange(n_keys, device=llama.device)[None, :] <= query_limits(selected, n_keys, mask)[:, None]
    h, q, k_new, v_new = state.h[:, selected], state.q[:, selected], state.k[:, selected], state.v[:, selected]
    for i in range(check_layer, len(llama.layers)):
        layer = llama.layers[i]
        if i > check_layer and selected.numel():
            q, k_new, v_new = llama.qkv(layer, h, selected)
        k, v = loaded.k[i].clone(), loaded.v[i].clone()
        k[selected], v[selected] = k_new[0], v_new[0]
        if selected.numel() and i < len(llama.layers) - 1:  # the last layer's output feeds nothing
            h = llama.finish(layer, h, llama.attend(layer, q, k[None], v[None], allowed))
        ks.append(k)
        vs.append(v)
    return ks, vs


def oracle_score(loaded: Loaded, full: KVCache, n_tokens: int):
    """Per token: loaded-vs-full-prefill KV deviation, summed over layers, each layer over its mean ||KV||^2."""
    import torch

    total = torch.zeros(n_tokens, dtype=torch.float32, device=loaded.k[0].device)
    for i in range(len(loaded.k)):
        fk, fv = full.k[i][0, :n_tokens].float(), full.v[i][0, :n_tokens].float()
        dev = ((loaded.k[i].float() - fk) ** 2 + (loaded.v[i].float() - fv) ** 2).flatten(1).sum(dim=1)
        norm = (fk ** 2 + fv ** 2).flatten(1).sum(dim=1).mean().clamp_min(1e-12)
        total += dev / norm
    return total


# --------------------------------------------------------------------------------------------------
# Variants, answers, metrics
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    key: str
    ratio: float
    mask: str  # "exact" or "bottom_right"
    selection: str  # "lmcache" (K deviation at the check layer) or "oracle"
    gaps: str  # "zero" (LMCache) or "fresh"


def plan_variants(ratios: Sequence[float], kinds: Sequence[str]) -> list[Variant]:
    """One variant per ratio and kind, leaving out those identical to another (ratio 0 and 1: masks coincide)."""
    unknown = [k for k in kinds if k not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {','.join(VARIANTS)}")
    out = []
    for r in ratios:
        for kind in kinds:
            edge = r <= 0 or r >= 1
            if edge and kind in ("bottom_right", "oracle"):
                continue
            mask = "bottom_right" if kind == "bottom_right" else "exact"
            out.append(Variant(f"r{r:g}/{kind}", r, mask, "oracle" if kind == "oracle" else "lmcache",
                               "fresh" if kind == "gaps" else "zero"))
    return out


def top_logprobs(logits_row, k: int = TOP_K) -> dict[int, float]:
    """Top-k raw log-probs (log_softmax over the whole vocabulary, as vLLM returns them)."""
    import torch

    values, idx = torch.log_softmax(logits_row.float(), dim=-1).topk(k)
    return dict(zip(idx.tolist(), values.tolist()))


def answer_rows(llama: ManualLlama, contexts: Sequence[Callable[[], tuple[list[Any], list[Any]]]],
                prompt: BlendPrompt, answer_tokens: int, eos: int | None) -> list[qm.Scored]:
    """Each row's context KV (made on demand, then dropped) + the trailing SEP and question prefilled, then
    greedy tokens; the rows decode as one batch (all contexts have the same length)."""
    import torch

    n_rows, t = len(contexts), prompt.blend_len
    cache = llama.new_cache(n_rows, len(prompt.ids) + answer_tokens)
    for row, make in enumerate(contexts):
        ks, vs = make()
        for i in range(len(llama.layers)):
            cache.k[i][row, :t] = ks[i]
            cache.v[i][row, :t] = vs[i]
        del ks, vs
    cache.length = t
    tail = torch.tensor([prompt.ids[t:]] * n_rows, device=llama.device)
    logits = llama.forward(tail, cache)
    firsts = [top_logprobs(logits[r]) for r in range(n_rows)]
    tokens = [logits.argmax(dim=-1)]
    for _ in range(answer_tokens - 1):
        tokens.append(llama.forward(tokens[-1][:, None], cache).argmax(dim=-1))
    greedy = torch.stack(tokens, dim=1).tolist()
    return [qm.Scored(_until_eos(g, eos), f) for g, f in zip(greedy, firsts)]


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    """vLLM stops at EOS (included): the harness's answers end there."""
    return tokens[:tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


@dataclass
class PromptOutcome:
    """One prompt: per-variant metrics against the full prefill, and what the selections looked like."""

    label: str
    tokens: int
    blend_len: int
    results: dict[str, qm.PromptResult]
    selected: dict[str, int] = field(default_factory=dict)
    gaps_selected: dict[str, float] = field(default_factory=dict)
    oracle_overlap: dict[str, float] = field(default_factory=dict)  # |lmcache ∩ oracle| / k
    self_check: dict[str, float] = field(default_factory=dict)


def run_prompt(llama: ManualLlama, stored: StoredKV, prompt: BlendPrompt, variants: Sequence[Variant],
               check_layer: int, answer_tokens: int, eos: int | None, rows_per_batch: int = 8) -> PromptOutcome:
    """Full prefill, shared check-layer state, every variant's blend, answers decoded in batches of rows."""
    import torch

    ids = torch.tensor([prompt.ids], device=llama.device)
    t = prompt.blend_len
    full = llama.new_cache(1, len(prompt.ids))
    full_logits = llama.forward(ids, full)[0]
    loaded = stored.load(prompt)
    state = check_state(llama, ids[:, :t], loaded, check_layer)
    gaps = torch.tensor(prompt.gaps, dtype=torch.long, device=llama.device)
    oracle = oracle_score(loaded, full, t) if any(v.selection == "oracle" for v in variants) else None
    out = PromptOutcome(prompt.label, len(prompt.ids), t, {})

    def reference() -> tuple[list[Any], list[Any]]:
        return [k[0, :t] for k in full.k], [v[0, :t] for v in full.v]

    def blended(var: Variant) -> Callable[[], tuple[list[Any], list[Any]]]:
        count = topk_count(t, var.ratio)
        sel = select_top(oracle if var.selection == "oracle" else state.k_deviation, count)
        if var.selection == "oracle":
            ours = select_top(state.k_deviation, count)
            out.oracle_overlap[var.key] = float(torch.isin(sel, ours).float().mean()) if count else 1.0
        out.gaps_selected[var.key] = float(torch.isin(gaps, sel).float().mean()) if gaps.numel() else 0.0
        if var.gaps == "fresh":
            sel = torch.unique(torch.cat([sel, gaps]))  # sorted
        out.selected[var.key] = int(sel.numel())
        return lambda: blend(llama, loaded, state, sel, var.mask, check_layer,
                             fresh_gaps=gaps if var.gaps == "fresh" else None)

    makers = [reference] + [blended(v) for v in variants]
    answers: list[qm.Scored] = []
    for i in range(0, len(makers), rows_per_batch):
        answers += answer_rows(llama, makers[i:i + rows_per_batch], prompt, answer_tokens, eos)
    ref = answers[0]
    ref_full = top_logprobs(full_logits)
    out.self_check["question_path_vs_full_prefill_max_abs_logprob"] = max(
        abs(ref_full[tok] - ref.first_top.get(tok, float("inf"))) for tok in ref_full)
    for var, ans in zip(variants, answers[1:]):
        out.results[var.key] = qm.compare(ref, ans, {}, {})
    return out


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------


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

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "kvdemo_commit": commit}


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def summarize(outcomes: Sequence[PromptOutcome], variants: Sequence[Variant]) -> list[dict]:
    """Per variant: kvdemo.quality.summarize over prompts, plus the selection statistics."""
    import statistics

    rows = []
    for v in variants:
        row = {"variant": v.key, "recompute_ratio": v.ratio, "mask": v.mask, "selection": v.selection,
               "gaps": v.gaps, **qm.summarize([o.results[v.key] for o in outcomes]),
               "mean_recomputed_tokens": statistics.fmean(o.selected[v.key] for o in outcomes),
               "gaps_in_selection": statistics.fmean(o.gaps_selected[v.key] for o in outcomes)}
        overlaps = [o.oracle_overlap[v.key] for o in outcomes if v.key in o.oracle_overlap]
        if overlaps:
            row["overlap_with_lmcache_selection"] = statistics.fmean(overlaps)
        rows.append(row)
    return rows


def paired_differences(prompt_rows: Sequence[dict], variants: Sequence[Variant]) -> list[dict]:
    """Per variant: its first-token KL minus ``exact``'s at the same ratio, prompt by prompt (mean, 95 % bootstrap
    interval): on the same prompts the prompt-to-prompt spread cancels, so few prompts already separate them."""
    out = []
    for v in variants:
        base = f"r{v.ratio:g}/exact"
        if v.key == base:
            continue
        diffs = [row["first_token_kl"][v.key] - row["first_token_kl"][base] for row in prompt_rows
                 if v.key in row["first_token_kl"] and base in row["first_token_kl"]]
        if diffs:
            mean, lo, hi = qm.bootstrap_mean_ci(diffs)
            out.append({"variant": v.key, "minus": base, "first_token_kl_diff": mean, "ci": [lo, hi]})
    return out


def engine_numbers() -> dict[str, Any]:
    """The engine's committed quality sweeps (40 prompts, bf16, H200), for reading next to these numbers."""
    out: dict[str, Any] = {}
    for name, path in (("exact_mask", REPO_ROOT / "benchmarks/results/quality-h200.json"),
                       ("lmcache_mask", REPO_ROOT / "benchmarks/results/steps/quality-nomask-h200.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out[name] = {"file": str(path.relative_to(REPO_ROOT)), "device": data.get("device"),
                     "n_prompts": data.get("n_prompts"), "control_kl": data.get("control", {}).get("first_token_kl"),
                     "sweep": [{k: r.get(k) for k in ("recompute_ratio", "first_token_kl", "first_token_kl_ci",
                                                      "mean_agree_prefix")} for r in data.get("sweep", [])]}
    return out


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
    variants = plan_variants(ratios, [k.strip() for k in a.variants.split(",") if k.strip()])
    check = check_layers(Path(a.lmcache_config))
    model, tokenizer = load_model(a.model, a.device, a.dtype)
    llama = ManualLlama(model)
    prompts = harness_prompts(tokenizer, a.prompts, seed=a.seed, lmcache_config=Path(a.lmcache_config))
    stored = StoredKV(llama)
    hf_diff = hf_consistency(model, llama, prompts[0]) if a.hf_check else None
    outcomes = []
    for n, p in enumerate(prompts, 1):
        t = time.monotonic()
        o = run_prompt(llama, stored, p, variants, check, a.answer_tokens, tokenizer.eos_token_id, a.rows)
        outcomes.append(o)
        kls = " ".join(f"{k}={r.first_token_kl:.4f}" for k, r in o.results.items())
        log(f"kvdemo.blend_oracle: prompt {n}/{len(prompts)} ({o.tokens} tokens, {time.monotonic() - t:.0f} s) {kls}")
    prompt_rows = [{"prompt": o.label, "tokens": o.tokens, "blend_tokens": o.blend_len,
                    "first_token_kl": {k: r.first_token_kl for k, r in o.results.items()},
                    "agree_prefix": {k: r.agree_prefix for k, r in o.results.items()}} for o in outcomes]
    result = {
        "what": "exact torch reference of LMCache 0.5.3 CacheBlend vs full prefill (kvdemo.blend_oracle)",
        "device": device_name(a.device), "dtype": a.dtype, "versions": versions(), "model": a.model,
        "command": "python -m kvdemo.blend_oracle " + argv_text, "n_prompts": len(prompts),
        "check_layer": check, "answer_tokens": a.answer_tokens, "top_k": TOP_K,
        "context_tokens": {"min": min(o.tokens for o in outcomes), "max": max(o.tokens for o in outcomes)},
        "self_check": {
            "manual_forward_vs_hf_max_abs_logprob": hf_diff,
            "question_path_vs_full_prefill_max_abs_logprob": max(
                o.self_check["question_path_vs_full_prefill_max_abs_logprob"] for o in outcomes)},
        "variants": summarize(outcomes, variants),
        "paired_vs_exact": paired_differences(prompt_rows, variants),
        "prompts": prompt_rows,
        "engine_for_comparison": engine_numbers(),
        "wall_s": time.monotonic() - t0,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"kvdemo.blend_oracle: wrote {out}")
    print_table(result, log)
    return result


def print_table(result: dict, log: Callable[[str], None] = print) -> None:
    log(f"  {result['n_prompts']} prompts, {result['device']}, {result['dtype']}; self-check {result['self_check']}")
    for r in result["variants"]:
        lo, hi = r["first_token_kl_ci"]
        log(f"  {r['variant']:<18} KL {r['first_token_kl']:.4f} [{lo:.4f}, {hi:.4f}]  prefix "
            f"{r['mean_agree_prefix']:.1f}/{result['answer_tokens']}  recomputed {r['mean_recomputed_tokens']:.0f}")
    for d in result.get("paired_vs_exact", []):
        log(f"  {d['variant']:<18} minus {d['minus']}: KL {d['first_token_kl_diff']:+.4f} "
            f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvdemo.blend_oracle", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF Llama model dir (python -m kvdemo.models smollm2 DIR)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--prompts", type=int, default=6, help="the harness's first N prompts")
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help="recompute ratios (0 = nothing after the check layer)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--answer-tokens", type=int, default=ANSWER_TOKENS, help="greedy tokens per answer")
    p.add_argument("--rows", type=int, default=8, help="answers decoded per batch (memory: ~T*L*KV per row)")
    p.add_argument("--seed", type=int, default=0, help="the harness's prompt sampling seed")
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
    run(a, shlex.join(sys.argv[1:] if argv is None else argv), log=lambda s: print(s, flush=True))
    return 0

