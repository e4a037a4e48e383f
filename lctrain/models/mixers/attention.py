"""`attn`: causal softmax attention with RoPE, GQA and document masking for packed sequences.

Besides full attention it has the sparse patterns of two context-extension methods:

* `mode: sf_attn` / `s2_attn` (SinkLoRA / LongLoRA): while training, heads attend within groups of tokens (half of
  them shifted by half a group) plus, for sf_attn, the first `sink` tokens of the document; evaluation and
  decoding use full attention (`lctrain.kernels.sf_attention`).
* a MoA plan (`model.attn_plan`): each head keeps an elastic sliding window alpha + beta * N plus the plan's sink
  tokens, at training and inference (the attention op with per-head windows).

The mixer computes q, k, v and hands them, with its pattern, to `lctrain.models.attend.attend`, which knows the
placement (decoding cache, MoA probing, sequence parallel, one device).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lctrain.config import ConfigError
from lctrain.models.attend import AttentionPattern, attend, kernel_backend
from lctrain.models.context import BatchContext
from lctrain.models.mixers.qkv import add_qkv, rotated_qkv
from lctrain.models.mixers.registry import register_mixer

@register_mixer("attn", "A")
class Attention(nn.Module):
    """Multi-head (grouped-query) causal self-attention.

    x [B, T, D] -> [B, T, D]. Queries have `n_heads` heads, keys/values `n_kv_heads`; RoPE on q and k with the
    batch's positions (reset per document); attention never crosses a document boundary.

    Options (`model.mixers.attn`): rope_theta; rope_scaling (position interpolation factor, e.g. 4 to extend a
    model to 4x its training length); mode (`full`, or `sf_attn` / `s2_attn` while training); group_size (tokens
    per group for those modes; 0: a quarter of the sequence); sink (sf_attn: global first tokens, default 4).
    """

    MODES = ("full", "sf_attn", "s2_attn")

    def __init__(self, model_cfg, layer_idx: int, rope_theta: float | None = None, rope_scaling: float = 1.0,
                 qk_norm: bool = False, mode: str = "full", group_size: int = 0, sink: int = 4):
        super().__init__()
        if mode not in self.MODES:
            raise ConfigError(f"model.mixers.attn.mode: {mode!r} is not allowed; expected one of {self.MODES}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0 or group_size % 2:
            raise ConfigError(f"model.mixers.attn.group_size: {group_size!r}; expected 0 (a quarter of the "
                              "sequence) or an even integer >= 2")
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise ConfigError(f"model.mixers.attn.sink: {sink!r}; expected an integer >= 0")
        if isinstance(rope_scaling, bool) or not isinstance(rope_scaling, (int, float)) or rope_scaling <= 0:
            raise ConfigError(f"model.mixers.attn.rope_scaling: {rope_scaling!r}; expected a positive number")
        if mode != "full" and model_cfg.n_heads % 2:
            raise ConfigError(f"model.mixers.attn.mode: {mode!r} splits heads in two halves; model.n_heads="
                              f"{model_cfg.n_heads} is odd")
        self.mode, self.group_size, self.sink = mode, group_size, sink
        self.plan = None  # MoA plan (set_plan)
        self.kv_budget = None  # (budget, recent): H2O cache eviction while decoding (lctrain.models.h2o)
        self.layer_idx = layer_idx
        self.backend = kernel_backend(model_cfg.attn_backend)
        add_qkv(self, model_cfg, rope_theta, rope_scaling)

    def set_plan(self, plan: dict | None) -> None:
        """Use this layer's per-head rules from a MoA plan (None, or a plan without this layer: full attention).
        The model sets it from `model.attn_plan` (`lctrain.moa.apply.set_attn_plan`)."""
        self.plan = plan if plan is not None and str(self.layer_idx) in plan["layers"] else None

    def _spans(self, length: int) -> tuple[tuple[int, ...], int]:
        """Per-head MoA windows at row length `length` and the plan's sink."""
        from lctrain.moa.plan import head_windows, plan_sink
        return tuple(head_windows(self.plan, self.layer_idx, length).tolist()), plan_sink(self.plan)

    def pattern(self) -> AttentionPattern:
        """What each query sees now: SF/S² groups while training in those modes, the plan's spans, or full."""
        groups = None
        if self.training and self.mode != "full":
            groups = (self.group_size, "sf" if self.mode == "sf_attn" else "s2", self.sink)
        return AttentionPattern(self.scale, spans=self._spans if self.plan is not None else None, groups=groups,
                                layer=self.layer_idx, kv_budget=self.kv_budget)

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q, k, v = rotated_qkv(self, x, ctx)
        o = attend(q, k, v, self.pattern(), ctx, self.backend)
        return self.o_proj(o.reshape(batch, seqlen, -1))
