"""The query/key/value/output projections and RoPE that the softmax mixers (`attn`, `swa`, `landmark`) share.

Attribute names are Llama's (`q_proj`, `k_proj`, `v_proj`, `o_proj`), so exports and imports map weights one
to one; keys and values have `n_kv_heads` heads (GQA).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from lctrain.models.blocks import RotaryEmbedding
from lctrain.models.context import BatchContext


def add_qkv(module: nn.Module, model_cfg, rope_theta: float | None = None, rope_scaling: float = 1.0) -> None:
    """Give `module` n_heads / n_kv_heads / head_dim / scale, the four projections and its rotary embedding."""
    d = model_cfg.d_model
    module.n_heads = model_cfg.n_heads
    module.n_kv_heads = model_cfg.n_kv_heads or model_cfg.n_heads
    module.head_dim = model_cfg.head_dim or d // module.n_heads
    module.scale = 1.0 / math.sqrt(module.head_dim)
    module.q_proj = nn.Linear(d, module.n_heads * module.head_dim, bias=False)
    module.k_proj = nn.Linear(d, module.n_kv_heads * module.head_dim, bias=False)
    module.v_proj = nn.Linear(d, module.n_kv_heads * module.head_dim, bias=False)
    module.o_proj = nn.Linear(module.n_heads * module.head_dim, d, bias=False)
    module.o_proj._is_residual_out = True
    module.rope = RotaryEmbedding(module.head_dim, rope_theta or model_cfg.rope_theta, float(rope_scaling))


def rotated_qkv(module: nn.Module, x: torch.Tensor, ctx: BatchContext):
    """x `[B, T, D]` -> q `[B, T, H, hd]`, k and v `[B, T, Hkv, hd]`, with RoPE at the batch's positions."""
    batch, seqlen, _ = x.shape
    q = module.q_proj(x).view(batch, seqlen, module.n_heads, module.head_dim)
    k = module.k_proj(x).view(batch, seqlen, module.n_kv_heads, module.head_dim)
    v = module.v_proj(x).view(batch, seqlen, module.n_kv_heads, module.head_dim)
    cos, sin = batch_cos_sin(module.rope, ctx)
    return RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin), v


def batch_cos_sin(rope: RotaryEmbedding, ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's RoPE tables, computed once per batch for every layer with the same rotary settings (eagerly;
    a compiled block computes its own: a cache hit would change the graph between a checkpointed block's forward
    and its recomputation)."""
    if torch.compiler.is_compiling():
        return rope.cos_sin(ctx.position_ids)
    key = ("rope", rope.head_dim, rope.theta, rope.scaling, rope.inv_freq.device)
    cached = ctx.extras.get(key)
    if cached is None or cached[0] is not ctx.position_ids:
        cached = ctx.extras[key] = (ctx.position_ids, *rope.cos_sin(ctx.position_ids))
    return cached[1], cached[2]
