"""`gdn`: Gated DeltaNet layer (Yang, Kautz & Hatamizadeh, 2024).

x -> q, k, v projections -> causal short convolutions + SiLU -> L2-normalised q, k
  -> S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = q_t^T S_t / sqrt(d_k)
  -> per-head RMSNorm(o) * SiLU(gate(x)) -> output projection.
alpha_t = exp(g_t), g_t = -exp(A_log) * softplus(a(x_t) + dt_bias) (Mamba2-style parameterisation and init);
beta_t = sigmoid(b(x_t)).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lctrain.models.blocks import RMSNorm
from lctrain.models.context import BatchContext
from lctrain.models.mixers.linear_common import op_dtype, run_linear_op, short_conv
from lctrain.models.mixers.registry import register_mixer
from lctrain.models.shortconv import ShortConvolution


def mamba2_decay_init(n_heads: int, a_range=(1.0, 16.0), dt_range=(1e-3, 1e-1)) -> tuple[torch.Tensor, torch.Tensor]:
    """A ~ U(a_range) (stored as log A) and dt ~ logU(dt_range) stored as softplus^{-1}(dt), so the initial decays
    exp(-A * dt) span slow and fast heads."""
    a = torch.empty(n_heads).uniform_(*a_range)
    dt = torch.exp(torch.empty(n_heads).uniform_(math.log(dt_range[0]), math.log(dt_range[1])))
    dt_bias = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
    return torch.log(a), dt_bias


@register_mixer("gdn", "G")
class GatedDeltaNet(nn.Module):
    def __init__(self, model_cfg, layer_idx: int, n_heads: int = 0, head_k_dim: int = 0, head_v_dim: int = 0,
                 conv_size: int = 4, backend: str | None = None):
        super().__init__()
        d = model_cfg.d_model
        self.layer_idx = layer_idx
        self.n_heads = n_heads or model_cfg.n_heads
        self.head_k_dim = head_k_dim or (model_cfg.head_dim or d // model_cfg.n_heads)
        self.head_v_dim = head_v_dim or 2 * self.head_k_dim
        self.backend = backend
        self.kernel_recompute = getattr(model_cfg, "kernel_recompute", True)
        key_dim, value_dim = self.n_heads * self.head_k_dim, self.n_heads * self.head_v_dim
        self.q_proj = nn.Linear(d, key_dim, bias=False)
        self.k_proj = nn.Linear(d, key_dim, bias=False)
        self.v_proj = nn.Linear(d, value_dim, bias=False)
        self.a_proj = nn.Linear(d, self.n_heads, bias=False)
        self.b_proj = nn.Linear(d, self.n_heads, bias=False)
        self.g_proj = nn.Linear(d, value_dim, bias=False)
        self.q_conv = ShortConvolution(key_dim, conv_size)
        self.k_conv = ShortConvolution(key_dim, conv_size)
        self.v_conv = ShortConvolution(value_dim, conv_size)
        self.o_norm = RMSNorm(self.head_v_dim, model_cfg.norm_eps)
        self.o_proj = nn.Linear(value_dim, d, bias=False)
        self.o_proj._is_residual_out = True
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.init_extra_()

    def init_extra_(self) -> None:
        a_log, dt_bias = mamba2_decay_init(self.n_heads)
        with torch.no_grad():
            self.A_log.copy_(a_log)
            self.dt_bias.copy_(dt_bias)

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        layer_cache = ctx.cache.setdefault(self.layer_idx, {}) if ctx.cache is not None else None
        q = short_conv(self.q_conv, self.q_proj(x), ctx, layer_cache, "q_conv")
        k = short_conv(self.k_conv, self.k_proj(x), ctx, layer_cache, "k_conv")
        v = short_conv(self.v_conv, self.v_proj(x), ctx, layer_cache, "v_conv")
        dtype = op_dtype(x)  # bf16 under bf16 autocast: the kernel's bf16 variant
        q = F.normalize(q.view(batch, seqlen, self.n_heads, self.head_k_dim).float(), dim=-1).to(dtype)
        k = F.normalize(k.view(batch, seqlen, self.n_heads, self.head_k_dim).float(), dim=-1).to(dtype)
        v = v.view(batch, seqlen, self.n_heads, self.head_v_dim).to(dtype)
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias)
        beta = torch.sigmoid(self.b_proj(x).float())
        o = run_linear_op("gated_delta_rule", q, k, v, ctx, layer_cache, backend=self.backend,
                          recompute=self.kernel_recompute,
                          g=g, beta=beta)
        gate = self.g_proj(x).view(batch, seqlen, self.n_heads, self.head_v_dim)
        o = self.o_norm(o) * F.silu(gate)
        return self.o_proj(o.reshape(batch, seqlen, -1))
