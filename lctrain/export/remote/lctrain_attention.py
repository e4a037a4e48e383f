"""Softmax-attention mixers of an lctrain export: `attn` (full causal), `swa` (sliding window + sinks) and
`landmark` (attention through landmark tokens). x [B, T, D] -> [B, T, D]; q, k, v [B, T, H, head_dim] with
rotary embedding (rotate-half layout) and grouped-query key/value heads. Padding keys are masked; windows, sinks
and landmark blocks count real-token positions (`StepContext`), so a padded row computes what it would alone."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .lctrain_blocks import rotate
from .lctrain_ops import landmark_attention, local_attention, masked_attention, positional_landmark_attention


class _RotaryProjections(nn.Module):
    """q/k/v/o projections shared by the attention mixers (names as in Llama: q_proj, k_proj, v_proj, o_proj)."""

    def __init__(self, config, layer_idx, n_heads, n_kv_heads, head_dim, theta, scaling=1.0):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.theta, self.scaling = theta, scaling
        self.scale = head_dim ** -0.5
        self.q_proj = nn.Linear(d, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d, bias=False)

    def project(self, x, position_ids):
        """x [B, T, D] -> rotated q [B, T, H, hd], rotated k and v [B, T, Hkv, hd]."""
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        return (rotate(q, position_ids, self.theta, self.scaling), rotate(k, position_ids, self.theta, self.scaling),
                v)

    def output(self, o):
        return self.o_proj(o.reshape(o.shape[0], o.shape[1], -1))


class Attention(_RotaryProjections):
    """Full causal attention; the cache keeps every key and value."""

    def __init__(self, config, layer_idx, opts):
        super().__init__(config, layer_idx, opts["n_heads"], opts["n_kv_heads"], opts["head_dim"],
                         opts["rope_theta"], opts.get("rope_scaling", 1.0))

    def forward(self, x, ctx, cache):
        q, k, v = self.project(x, ctx.positions)
        if cache is not None:
            entry = cache.layer(self.layer_idx)
            if "k" in entry:
                k, v = torch.cat([entry["k"], k], dim=1), torch.cat([entry["v"], v], dim=1)
            entry["k"], entry["v"] = k.detach(), v.detach()
        if ctx.past == 0 and not ctx.padded:
            return self.output(masked_attention(q, k, v, None, self.scale))
        return self.output(masked_attention(q, k, v, ctx.causal_visible(), self.scale))


class SlidingWindowAttention(_RotaryProjections):
    """Each query sees the last `window` tokens (itself included) and the first `sink` tokens. The cache is
    rolling: the sink keys and the `window - 1` most recent ones, so it stays the same size while decoding."""

    def __init__(self, config, layer_idx, opts):
        super().__init__(config, layer_idx, config.num_attention_heads, config.num_key_value_heads,
                         config.head_dim, opts["rope_theta"])
        self.window, self.sink = opts["window"], opts.get("sink", 0)

    def forward(self, x, ctx, cache):
        q, k, v = self.project(x, ctx.positions)
        if cache is None and not ctx.padded:
            return self.output(local_attention(q, k, v, self.window, self.sink, self.scale))
        seqlen = x.shape[1]
        key_pos, key_ok = ctx.positions, ctx.causal_visible()[:, :, -seqlen:]  # [B, T], [B|1, T, T]
        key_valid = ctx.valid if ctx.valid is not None else torch.ones_like(ctx.positions, dtype=torch.bool)
        entry = cache.layer(self.layer_idx) if cache is not None else None
        if entry is not None and "k" in entry:  # kept keys all precede this call: causally visible if valid
            k, v = torch.cat([entry["k"], k], dim=1), torch.cat([entry["v"], v], dim=1)
            key_pos = torch.cat([entry["pos"], key_pos], dim=1)
            earlier = entry["valid"][:, None, :].expand(-1, seqlen, -1)
            key_ok = torch.cat([earlier, key_ok.expand(x.shape[0], -1, -1)], dim=2)
            key_valid = torch.cat([entry["valid"], key_valid], dim=1)
        gap = ctx.positions[:, :, None] - key_pos[:, None, :]
        in_window = (gap >= 0) & ((gap < self.window) | (key_pos[:, None, :] < self.sink))
        diagonal = torch.zeros_like(in_window)
        diagonal[:, :, -seqlen:] = torch.eye(seqlen, dtype=torch.bool, device=x.device)
        o = masked_attention(q, k, v, (key_ok & in_window) | diagonal, self.scale)
        if entry is not None:
            # Keep, per row, what a later query can still reach: its sinks and its last window - 1 real keys. The
            # kept slots are the union over rows; a slot one row no longer needs is marked invalid for that row.
            following = self._next_position(ctx)
            needed = key_valid & ((key_pos < self.sink) | (following[:, None] - key_pos < self.window))
            keep = needed.any(dim=0)
            entry["k"], entry["v"] = k[:, keep].detach(), v[:, keep].detach()
            entry["pos"], entry["valid"] = key_pos[:, keep], needed[:, keep]
        return self.output(o)

    @staticmethod
    def _next_position(ctx):
        """Position of the next real token of each row, from the whole history. [B] long."""
        if not ctx.padded:
            return ctx.key_positions[:, -1] + 1
        return ctx.key_positions.masked_fill(~ctx.key_valid, -1).max(dim=1).values + 1


class LandmarkAttention(_RotaryProjections):
    """Landmark attention with the training-time grouped softmax over every block (what lctrain's decoding does
    with retrieve_top_k = 0); the cache keeps every key and value. Landmark tokens are ordinary input ids: they
    must sit where lctrain's data pipeline puts them (the last token of every block of `block_size`)."""

    def __init__(self, config, layer_idx, opts):
        super().__init__(config, layer_idx, config.num_attention_heads, config.num_key_value_heads,
                         config.head_dim, opts["rope_theta"])
        self.block_size = opts["block_size"]

    def forward(self, x, ctx, cache):
        q, k, v = self.project(x, ctx.positions)
        if cache is not None:  # keys and values are cached with their n_kv_heads heads
            entry = cache.layer(self.layer_idx)
            if "k" in entry:
                k, v = torch.cat([entry["k"], k], dim=1), torch.cat([entry["v"], v], dim=1)
            entry["k"], entry["v"] = k.detach(), v.detach()
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        if not ctx.padded:  # one unpadded sequence per row, starting at position 0
            return self.output(landmark_attention(q, k, v, ctx.past, self.block_size, self.scale))
        o = positional_landmark_attention(q, k, v, ctx.positions, ctx.key_positions, ctx.causal_visible(),
                                          self.block_size, self.scale)
        return self.output(o)
