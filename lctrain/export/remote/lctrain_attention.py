"""Softmax-attention mixers of an lctrain export: `attn` (full causal), `swa` (sliding window + sinks) and
`landmark` (attention through landmark tokens). x [B, T, D] -> [B, T, D]; q, k, v [B, T, H, head_dim] with
rotary embedding (rotate-half layout) and grouped-query key/value heads."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .lctrain_blocks import rotate
from .lctrain_ops import landmark_attention, local_attention, windowed_attention


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

    def forward(self, x, position_ids, cache):
        seqlen = x.shape[1]
        q, k, v = self.project(x, position_ids)
        past = 0
        if cache is not None:
            entry = cache.layer(self.layer_idx)
            if "k" in entry:
                past = entry["k"].shape[1]
                k, v = torch.cat([entry["k"], k], dim=1), torch.cat([entry["v"], v], dim=1)
            entry["k"], entry["v"] = k, v
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)
        q_index = torch.arange(past, past + seqlen, device=x.device)
        mask = torch.arange(k.shape[1], device=x.device)[None, :] <= q_index[:, None]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=self.scale)
        return self.output(o.transpose(1, 2))


class SlidingWindowAttention(_RotaryProjections):
    """Each query sees the last `window` tokens (itself included) and the first `sink` tokens. The cache is
    rolling: the sink keys and the `window - 1` most recent ones, so it stays the same size while decoding."""

    def __init__(self, config, layer_idx, opts):
        super().__init__(config, layer_idx, config.num_attention_heads, config.num_key_value_heads,
                         config.head_dim, opts["rope_theta"])
        self.window, self.sink = opts["window"], opts.get("sink", 0)

    def forward(self, x, position_ids, cache):
        q, k, v = self.project(x, position_ids)
        if cache is None:
            return self.output(local_attention(q, k, v, self.window, self.sink, self.scale))
        entry = cache.layer(self.layer_idx)
        seen = entry.get("seen", 0)
        positions = torch.arange(seen, seen + x.shape[1], device=x.device)
        if "k" in entry:
            k, v = torch.cat([entry["k"], k], dim=1), torch.cat([entry["v"], v], dim=1)
            key_pos = torch.cat([entry["pos"], positions])
        else:
            key_pos = positions
        o = windowed_attention(q, k, v, positions, key_pos, self.window, self.sink, self.scale)
        # Keep what a later query (position >= seen + T) can still reach: sinks and the last window - 1 keys.
        following = seen + x.shape[1]
        keep = (key_pos < self.sink) | (following - key_pos < self.window)
        entry["k"], entry["v"], entry["pos"] = k[:, keep].detach(), v[:, keep].detach(), key_pos[keep]
        entry["seen"] = following
        return self.output(o)


class LandmarkAttention(_RotaryProjections):
    """Landmark attention with the training-time grouped softmax over every block (what lctrain's decoding does
    with retrieve_top_k = 0); the cache keeps every key and value. Landmark tokens are ordinary input ids: they
    must sit where lctrain's data pipeline puts them (the last token of every block of `block_size`)."""

    def __init__(self, config, layer_idx, opts):
        super().__init__(config, layer_idx, config.num_attention_heads, config.num_key_value_heads,
                         config.head_dim, opts["rope_theta"])
        self.block_size = opts["block_size"]

    def forward(self, x, position_ids, cache):
        q, k, v = self.project(x, position_ids)
        start = 0
        if cache is not None:  # keys and values are cached with their n_kv_heads heads
            entry = cache.layer(self.layer_idx)
            if "k" in entry:
                start = entry["k"].shape[1]
                k, v = torch.cat([entry["k"], k], dim=1), torch.cat([entry["v"], v], dim=1)
            entry["k"], entry["v"] = k.detach(), v.detach()
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        return self.output(landmark_attention(q, k, v, start, self.block_size, self.scale))
