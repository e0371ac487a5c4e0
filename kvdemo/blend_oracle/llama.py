"""The model, one module at a time: a Llama forward (prefill, decode) with the HF model's own modules and an
explicit KV cache, so that each layer's KV can be swapped (core.py blends with it). torch inside the functions."""

from __future__ import annotations


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
