"""`conv`: BASED's gated convolution block (BaseConv-style), the short-range half of the BASED architecture.

x -> u = in_proj(x), g = gate_proj(x) -> y = causal_depthwise_conv(u) * g -> out_proj(y).
The depthwise causal convolution (`lctrain.models.shortconv`, `kernel_size` taps, no activation) never reaches
across a document boundary; decoding keeps its last `kernel_size - 1` inputs in the layer cache, and sequence
parallelism fetches them from the neighbouring shard.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lctrain.config import ConfigError
from lctrain.models.context import BatchContext
from lctrain.models.mixers.linear_common import short_conv
from lctrain.models.mixers.registry import register_mixer
from lctrain.models.shortconv import ShortConvolution


@register_mixer("conv", "C")
class GatedConvolution(nn.Module):
    """x `[B, T, D]` -> `[B, T, D]`. Options (`model.mixers.conv`): kernel_size (taps of the causal depthwise
    convolution; default 32), expand (inner width = expand * d_model; default 1)."""

    def __init__(self, model_cfg, layer_idx: int, kernel_size: int = 32, expand: int = 1):
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ConfigError(f"model.mixers.conv.kernel_size: must be an int >= 1, got {kernel_size!r}")
        if isinstance(expand, bool) or not isinstance(expand, int) or expand < 1:
            raise ConfigError(f"model.mixers.conv.expand: must be an int >= 1, got {expand!r}")
        d = model_cfg.d_model
        inner = expand * d
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(d, inner, bias=False)
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.conv = ShortConvolution(inner, kernel_size, activation=False)
        self.out_proj = nn.Linear(inner, d, bias=False)
        self.out_proj._is_residual_out = True

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        layer_cache = ctx.cache.setdefault(self.layer_idx, {}) if ctx.cache is not None else None
        u = short_conv(self.conv, self.in_proj(x), ctx, layer_cache, "conv")
        return self.out_proj(u * self.gate_proj(x))
