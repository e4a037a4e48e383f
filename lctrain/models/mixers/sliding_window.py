"""`swa`: sliding-window causal softmax attention (optionally with attention sinks), RoPE, GQA, document masking.

Each query attends the last `window` tokens of its own document (itself included) plus the first `sink` tokens
of that document, through the attention op's window form (`lctrain.models.attend`; O(T * (window + sink)) time
and memory, sequence parallel by a halo exchange). Decoding
keeps a rolling cache: the `sink` first keys/values and the `window - 1` most recent ones, so memory per layer
stays constant however long the generation.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from lctrain.config import ConfigError
from lctrain.models.attend import AttentionPattern, attend, kernel_backend
from lctrain.models.context import BatchContext
from lctrain.models.mixers.qkv import add_qkv, rotated_qkv
from lctrain.models.mixers.registry import register_mixer


@register_mixer("swa", "S")
class SlidingWindowAttention(nn.Module):
    """Grouped-query sliding-window attention: x `[B, T, D]` -> `[B, T, D]`.

    Options (`model.mixers.swa`): window (tokens each query sees, itself included; default 64), sink (first
    tokens of each document every query also sees; default 0), rope_theta, backend (kernel backend, None = auto).
    """

    def __init__(self, model_cfg, layer_idx: int, window: int = 64, sink: int = 0,
                 rope_theta: float | None = None, backend: str | None = None):
        super().__init__()
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"model.mixers.swa.window: must be an int >= 1, got {window!r}")
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise ConfigError(f"model.mixers.swa.sink: must be an int >= 0, got {sink!r}")
        self.layer_idx = layer_idx
        self.window, self.sink, self.backend = window, sink, backend
        add_qkv(self, model_cfg, rope_theta)

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q, k, v = rotated_qkv(self, x, ctx)
        if ctx.cache is not None:  # a rolling cache of sink + window entries, not the full one
            o = self._attend_cached(q, k, v, ctx.cache.setdefault(self.layer_idx, {}))
        else:
            spans = (self.window, self.sink)
            pattern = AttentionPattern(self.scale, spans=lambda length: spans, layer=self.layer_idx, probed=False)
            o = attend(q, k, v, pattern, ctx, kernel_backend(self.backend))
        return self.o_proj(o.reshape(batch, seqlen, -1))

    def _attend_cached(self, q, k, v, entry: dict) -> torch.Tensor:
        """Incremental decoding (one document per row, every row at the same position).

        The cache holds the sink entries (positions < sink) and the `window - 1` most recent entries with their
        positions; new queries attend [sink entries, recent entries, new entries] under the same rule as
        training. A recent entry that is also a sink entry is masked once, so nothing counts twice.
        """
        new = q.shape[1]
        seen = entry.get("seen", 0)
        positions = torch.arange(seen, seen + new, device=q.device)
        empty_k = k[:, :0]
        sink_k, sink_v = entry.get("sink_k", empty_k), entry.get("sink_v", v[:, :0])
        recent_k, recent_v = entry.get("recent_k", empty_k), entry.get("recent_v", v[:, :0])
        recent_pos = entry.get("recent_pos", positions[:0])
        num_sink = sink_k.shape[1]  # the cached sink entries are exactly positions [0, num_sink)
        keys = torch.cat([sink_k, recent_k, k], dim=1)
        values = torch.cat([sink_v, recent_v, v], dim=1)
        key_pos = torch.cat([torch.arange(num_sink, device=q.device), recent_pos, positions])
        is_sink_entry = torch.arange(keys.shape[1], device=q.device) < num_sink
        causal = key_pos[None, :] <= positions[:, None]
        in_span = (positions[:, None] - key_pos[None, :] < self.window) | (key_pos[None, :] < self.sink)
        mask = causal & torch.where(is_sink_entry[None, :], True, in_span & (key_pos[None, :] >= num_sink))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=mask[None, None], scale=self.scale,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        # Roll the cache forward: sink entries are the first `sink` positions ever seen, recent ones the last
        # `window - 1` (what any later query can still reach through its window).
        keep_sink = max(0, min(self.sink, seen + new) - num_sink)
        entry["sink_k"] = torch.cat([sink_k, k[:, :keep_sink]], dim=1).detach()
        entry["sink_v"] = torch.cat([sink_v, v[:, :keep_sink]], dim=1).detach()
        keep_recent = self.window - 1
        all_pos = torch.cat([recent_pos, positions])
        entry["recent_k"] = torch.cat([recent_k, k], dim=1)[:, all_pos.numel() - min(keep_recent, all_pos.numel()):].detach()
        entry["recent_v"] = torch.cat([recent_v, v], dim=1)[:, all_pos.numel() - min(keep_recent, all_pos.numel()):].detach()
        entry["recent_pos"] = all_pos[all_pos.numel() - min(keep_recent, all_pos.numel()):]
        entry["seen"] = seen + new
        return out.transpose(1, 2)
