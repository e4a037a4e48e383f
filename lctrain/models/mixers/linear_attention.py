"""`linear`: linear attention with a fixed per-head decay (Lightning Attention / TransNormerLLM style).

q = SiLU(W_q x), k = SiLU(W_k x), v = W_v x;  S_t = lambda_h S_{t-1} + k_t v_t^T,  o_t = q_t^T S_t / sqrt(d_k);
output = W_o (RMSNorm(o) * sigmoid(W_u x)). The decays lambda_h = exp(-slope_h) use ALiBi-like geometric slopes,
weaker in deeper layers (TransNormerLLM), so heads see a range of context lengths from the first step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lctrain.models.blocks import RMSNorm
from lctrain.models.context import BatchContext
from lctrain.models.mixers.linear_common import run_linear_op
from lctrain.models.mixers.registry import register_mixer


def decay_slopes(n_heads: int, layer_idx: int, n_layers: int) -> torch.Tensor:
    """Per-head log decay (<= 0): -(2^(-8/H))^(h+1) scaled by (1 - layer/n_layers), floored so no head is
    exactly non-decaying."""
    base = 2.0 ** (-8.0 / n_heads)
    slopes = torch.tensor([base ** (h + 1) for h in range(n_heads)], dtype=torch.float32)
    depth = 1.0 - layer_idx / max(n_layers, 1) + 1e-5
    return -(slopes * depth).clamp_min(1e-5)


@register_mixer("linear", "L")
class LinearAttention(nn.Module):
    def __init__(self, model_cfg, layer_idx: int, n_heads: int = 0, head_dim: int = 0, backend: str | None = None):
        super().__init__()
        d = model_cfg.d_model
        self.layer_idx = layer_idx
        self.n_heads = n_heads or model_cfg.n_heads
        self.head_dim = head_dim or (model_cfg.head_dim or d // model_cfg.n_heads)
        self.backend = backend
        self.kernel_recompute = getattr(model_cfg, "kernel_recompute", True)
        inner = self.n_heads * self.head_dim
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.u_proj = nn.Linear(d, inner, bias=False)
        self.o_norm = RMSNorm(self.head_dim, model_cfg.norm_eps)
        self.o_proj = nn.Linear(inner, d, bias=False)
        self.o_proj._is_residual_out = True
        self.register_buffer("log_decay", decay_slopes(self.n_heads, layer_idx, model_cfg.n_layers),
                             persistent=False)

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        shape = (batch, seqlen, self.n_heads, self.head_dim)
        q = F.silu(self.q_proj(x)).view(shape)
        k = F.silu(self.k_proj(x)).view(shape)
        v = self.v_proj(x).view(shape)
        layer_cache = ctx.cache.setdefault(self.layer_idx, {}) if ctx.cache is not None else None
        o = run_linear_op("linear_attention", q, k, v, ctx, layer_cache, backend=self.backend,
                          recompute=self.kernel_recompute,
                          log_decay=self.log_decay)
        o = self.o_norm(o) * torch.sigmoid(self.u_proj(x).view(shape))
        return self.o_proj(o.reshape(batch, seqlen, -1))
