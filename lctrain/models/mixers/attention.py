"""`attn`: full causal softmax attention with RoPE, GQA and document masking for packed sequences."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lctrain.models.blocks import RotaryEmbedding
from lctrain.models.context import BatchContext, document_ids
from lctrain.models.mixers.registry import register_mixer

try:  # flash-attn is an optional extra; used for CUDA bf16/fp16 when installed
    from flash_attn import flash_attn_varlen_func
except Exception:  # pragma: no cover - depends on the environment
    flash_attn_varlen_func = None


def document_causal_mask(q_docs: torch.Tensor, k_docs: torch.Tensor, q_index: torch.Tensor,
                         k_index: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, Tq, Tk]: key j is visible to query i iff same document and j <= i (global indices)."""
    same = q_docs[:, :, None] == k_docs[:, None, :]
    causal = k_index[None, None, :] <= q_index[None, :, None]
    return (same & causal)[:, None]


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor,
                     scale: float, backend: str = "auto") -> torch.Tensor:
    """Causal attention within documents. q [B, T, H, D], k/v [B, T, Hkv, D] (Hkv divides H) -> [B, T, H, D]."""
    batch, seqlen, heads, dim = q.shape
    use_flash = (backend in ("auto", "flash") and flash_attn_varlen_func is not None and q.is_cuda
                 and q.dtype in (torch.float16, torch.bfloat16))
    if backend == "flash" and not use_flash:
        raise RuntimeError("model.attn_backend='flash' needs flash-attn installed and CUDA bf16/fp16 tensors")
    if use_flash:
        from lctrain.models.context import cu_seqlens_from_positions
        cu = cu_seqlens_from_positions(position_ids)
        max_len = int((cu[1:] - cu[:-1]).max())
        out = flash_attn_varlen_func(q.reshape(batch * seqlen, heads, dim), k.reshape(batch * seqlen, -1, dim),
                                     v.reshape(batch * seqlen, -1, dim), cu, cu, max_len, max_len,
                                     softmax_scale=scale, causal=True)
        return out.reshape(batch, seqlen, heads, dim)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = kt.shape[1] != qt.shape[1]
    single_document = bool((position_ids[:, 1:] != 0).all()) if seqlen > 1 else True
    if single_document:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        docs = document_ids(position_ids)
        index = torch.arange(seqlen, device=q.device)
        mask = document_causal_mask(docs, docs, index, index)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


@register_mixer("attn", "A")
class Attention(nn.Module):
    """Multi-head (grouped-query) causal self-attention.

    x [B, T, D] -> [B, T, D]. Queries have `n_heads` heads, keys/values `n_kv_heads`; RoPE on q and k with the
    batch's positions (reset per document); attention never crosses a document boundary.
    """

    def __init__(self, model_cfg, layer_idx: int, rope_theta: float | None = None, rope_scaling: float = 1.0,
                 qk_norm: bool = False):
        super().__init__()
        d = model_cfg.d_model
        self.layer_idx = layer_idx
        self.n_heads = model_cfg.n_heads
        self.n_kv_heads = model_cfg.n_kv_heads or model_cfg.n_heads
        self.head_dim = model_cfg.head_dim or d // self.n_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.backend = model_cfg.attn_backend
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.o_proj._is_residual_out = True
        self.rope = RotaryEmbedding(self.head_dim, rope_theta or model_cfg.rope_theta, rope_scaling)

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        cos, sin = self.rope.cos_sin(ctx.position_ids)
        q, k = RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin)
        if ctx.cache is not None:
            o = self._attend_cached(q, k, v, ctx.cache)
        elif ctx.sp is not None:
            from lctrain.parallel import sp_attention
            o = sp_attention(q, k, v, ctx.sp, scale=self.scale)
        else:
            o = packed_attention(q, k, v, ctx.position_ids, self.scale, self.backend)
        return self.o_proj(o.reshape(batch, seqlen, -1))

    def _attend_cached(self, q, k, v, cache: dict) -> torch.Tensor:
        """Incremental decoding (one document per row): append k/v to the cache and attend to all of it."""
        entry = cache.setdefault(self.layer_idx, {})
        if "k" in entry:
            k = torch.cat([entry["k"], k], dim=1)
            v = torch.cat([entry["v"], v], dim=1)
        entry["k"], entry["v"] = k, v
        new, total = q.shape[1], k.shape[1]
        q_index = torch.arange(total - new, total, device=q.device)
        k_index = torch.arange(total, device=q.device)
        mask = (k_index[None, :] <= q_index[:, None])[None, None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=self.scale,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return out.transpose(1, 2)
