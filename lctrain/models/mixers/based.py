"""`based`: BASED linear attention (Arora et al., 2024) — the Taylor-feature-map half of the BASED architecture.

x -> q, k projected to a small feature dim per head (16 by default), v to the head dim
  -> o_t = sum_{s<=t} (1 + x + x^2/2) v_s / (sum_{s<=t} (1 + x + x^2/2) + eps),  x = q_t . k_s / sqrt(feature_dim)
  -> output projection.
Runs `lctrain.kernels.taylor_linear_attention`; packed documents start from a zero state, and decoding carries
the op's additive state (`[B, H, 1 + F + F^2, head_dim + 1]`) in the layer cache.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lctrain.config import ConfigError
from lctrain.models.context import BatchContext
from lctrain.models.mixers.linear_common import run_linear_op
from lctrain.models.mixers.registry import register_mixer

MAX_FEATURE_DIM = 32


@register_mixer("based", "B")
class BasedLinearAttention(nn.Module):
    """x `[B, T, D]` -> `[B, T, D]`. Options (`model.mixers.based`): n_heads (default model.n_heads), feature_dim
    (q/k width per head, <= 32; default 16), head_dim (value width per head; default d_model / n_heads),
    backend (kernel backend, None = auto). The normaliser's eps is the op's default (1e-6)."""

    def __init__(self, model_cfg, layer_idx: int, n_heads: int = 0, feature_dim: int = 16, head_dim: int = 0,
                 backend: str | None = None):
        super().__init__()
        if not isinstance(feature_dim, int) or not 1 <= feature_dim <= MAX_FEATURE_DIM:
            raise ConfigError(f"model.mixers.based.feature_dim: must be an int in [1, {MAX_FEATURE_DIM}] (the state "
                              f"has 1 + F + F^2 rows), got {feature_dim!r}")
        d = model_cfg.d_model
        self.layer_idx = layer_idx
        self.n_heads = n_heads or model_cfg.n_heads
        self.feature_dim = feature_dim
        self.head_dim = head_dim or d // self.n_heads
        self.backend = backend
        self.kernel_recompute = getattr(model_cfg, "kernel_recompute", True)
        self.q_proj = nn.Linear(d, self.n_heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.o_proj._is_residual_out = True

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        layer_cache = ctx.cache.setdefault(self.layer_idx, {}) if ctx.cache is not None else None
        q = self.q_proj(x).view(batch, seqlen, self.n_heads, self.feature_dim)
        k = self.k_proj(x).view(batch, seqlen, self.n_heads, self.feature_dim)
        v = self.v_proj(x).view(batch, seqlen, self.n_heads, self.head_dim)
        o = run_linear_op("taylor_linear_attention", q, k, v, ctx, layer_cache, backend=self.backend,
                          recompute=self.kernel_recompute)
        return self.o_proj(o.reshape(batch, seqlen, -1))
