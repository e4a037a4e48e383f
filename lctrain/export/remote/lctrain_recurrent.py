"""Recurrent and convolutional mixers of an lctrain export. x [B, T, D] -> [B, T, D]; the cache entry of a layer
holds its recurrent state (`state`) and the last inputs of its short convolutions.
- `gdn`: Gated DeltaNet. S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = q_t^T S_t / sqrt(K),
  with causal short convolutions + SiLU on q, k, v, L2-normalised q, k, g_t = -exp(A_log) softplus(a(x) + dt_bias),
  beta_t = sigmoid(b(x)), output RMSNorm(o) * SiLU(gate(x)).
- `linear`: decayed linear attention. S_t = exp(log_decay_h) S_{t-1} + k_t v_t^T, o_t = q_t^T S_t / sqrt(K) with
  q, k = SiLU(.), output RMSNorm(o) * sigmoid(u(x)).
- `based`: BASED linear attention, o_t = sum_s score_ts v_s / (sum_s score_ts + 1e-6) with the Taylor score
  1 + x + x^2 / 2, x = q_t . k_s / sqrt(feature_dim).
- `conv`: BASED's gated convolution, out(causal_depthwise_conv(in(x)) * gate(x)), no activation.
Padding (ctx.valid False) is an identity step: decay 1 and no write for the recurrences, no contribution to the
Taylor sums, and short convolutions read the k - 1 real inputs before a token, never padding.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .lctrain_blocks import RMSNorm, ShortConvolution
from .lctrain_ops import gated_delta_rule, linear_attention, taylor_linear_attention


def _entry(cache, layer_idx):
    return cache.layer(layer_idx) if cache is not None else None


def _run(op, entry, *args):
    """Call a recurrent op from the cached state (if any) and store its final state."""
    o, state = op(*args, entry.get("state") if entry is not None else None)
    if entry is not None:
        entry["state"] = state.detach()
    return o


class GatedDeltaNet(nn.Module):
    def __init__(self, config, layer_idx, opts):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.n_heads, self.head_k_dim, self.head_v_dim = opts["n_heads"], opts["head_k_dim"], opts["head_v_dim"]
        key_dim, value_dim = self.n_heads * self.head_k_dim, self.n_heads * self.head_v_dim
        self.q_proj = nn.Linear(d, key_dim, bias=False)
        self.k_proj = nn.Linear(d, key_dim, bias=False)
        self.v_proj = nn.Linear(d, value_dim, bias=False)
        self.a_proj = nn.Linear(d, self.n_heads, bias=False)
        self.b_proj = nn.Linear(d, self.n_heads, bias=False)
        self.g_proj = nn.Linear(d, value_dim, bias=False)
        self.q_conv = ShortConvolution(key_dim, opts["conv_size"])
        self.k_conv = ShortConvolution(key_dim, opts["conv_size"])
        self.v_conv = ShortConvolution(value_dim, opts["conv_size"])
        self.o_norm = RMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(value_dim, d, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))

    def forward(self, x, ctx, cache):
        batch, seqlen, _ = x.shape
        entry = _entry(cache, self.layer_idx)
        q = self.q_conv(self.q_proj(x), entry, "q_conv", ctx.valid)
        k = self.k_conv(self.k_proj(x), entry, "k_conv", ctx.valid)
        v = self.v_conv(self.v_proj(x), entry, "v_conv", ctx.valid)
        q = F.normalize(q.view(batch, seqlen, self.n_heads, self.head_k_dim).float(), dim=-1).to(x.dtype)
        k = F.normalize(k.view(batch, seqlen, self.n_heads, self.head_k_dim).float(), dim=-1).to(x.dtype)
        v = v.view(batch, seqlen, self.n_heads, self.head_v_dim)
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias)
        beta = torch.sigmoid(self.b_proj(x).float())
        if ctx.valid is not None:  # g = 0, beta = 0: S_t = S_{t-1}
            real = ctx.valid[..., None].float()
            g, beta = g * real, beta * real
        o = _run(gated_delta_rule, entry, q, k, v, g, beta)
        gate = self.g_proj(x).view(batch, seqlen, self.n_heads, self.head_v_dim)
        o = self.o_norm(o.to(x.dtype)) * F.silu(gate)
        return self.o_proj(o.reshape(batch, seqlen, -1))


class LinearAttention(nn.Module):
    def __init__(self, config, layer_idx, opts):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim = opts["n_heads"], opts["head_dim"]
        inner = self.n_heads * self.head_dim
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.u_proj = nn.Linear(d, inner, bias=False)
        self.o_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(inner, d, bias=False)
        # The per-head decays are stored with the weights, so this file never has to re-derive lctrain's schedule.
        self.register_buffer("log_decay", torch.zeros(self.n_heads, dtype=torch.float32))

    def forward(self, x, ctx, cache):
        batch, seqlen, _ = x.shape
        shape = (batch, seqlen, self.n_heads, self.head_dim)
        q = F.silu(self.q_proj(x)).view(shape)
        k = F.silu(self.k_proj(x)).view(shape)
        v = self.v_proj(x).view(shape)
        log_decay = self.log_decay.float()
        if ctx.valid is not None:  # decay 1 and k = 0 at padding: S_t = S_{t-1}
            real = ctx.valid[..., None]
            log_decay = log_decay[None, None, :] * real.float()
            k = k * real[..., None].to(k.dtype)
        o = _run(linear_attention, _entry(cache, self.layer_idx), q, k, v, log_decay)
        o = self.o_norm(o.to(x.dtype)) * torch.sigmoid(self.u_proj(x).view(shape))
        return self.o_proj(o.reshape(batch, seqlen, -1))


class BasedLinearAttention(nn.Module):
    """q, k [B, T, H, feature_dim]; v [B, T, H, head_dim]; state [B, H, 1 + F + F^2, head_dim + 1]."""

    def __init__(self, config, layer_idx, opts):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.n_heads, self.feature_dim, self.head_dim = opts["n_heads"], opts["feature_dim"], opts["head_dim"]
        self.q_proj = nn.Linear(d, self.n_heads * self.feature_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_heads * self.feature_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, ctx, cache):
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.n_heads, self.feature_dim)
        k = self.k_proj(x).view(batch, seqlen, self.n_heads, self.feature_dim)
        v = self.v_proj(x).view(batch, seqlen, self.n_heads, self.head_dim)
        entry = _entry(cache, self.layer_idx)
        o, state = taylor_linear_attention(q, k, v, entry.get("state") if entry is not None else None, ctx.valid)
        if entry is not None:
            entry["state"] = state.detach()
        return self.o_proj(o.reshape(batch, seqlen, -1))


class GatedConvolution(nn.Module):
    def __init__(self, config, layer_idx, opts):
        super().__init__()
        d = config.hidden_size
        inner = opts.get("expand", 1) * d
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(d, inner, bias=False)
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.conv = ShortConvolution(inner, opts["kernel_size"], activation=False)
        self.out_proj = nn.Linear(inner, d, bias=False)

    def forward(self, x, ctx, cache):
        u = self.conv(self.in_proj(x), _entry(cache, self.layer_idx), "conv", ctx.valid)
        return self.out_proj(u * self.gate_proj(x))
