"""Causal depthwise short convolution whose window never reaches across a document boundary.

Used by GatedDeltaNet (and BASED's gated convolutions) before the recurrent op. out_t = sum_i w_i * x_{t-i} over the
last `kernel_size` tokens of the same document: with a kernel of 4 this is four shifted, masked copies — exact,
cheap, and trivially correct for packed documents. For decoding and sequence parallelism the caller passes the
previous `kernel_size - 1` inputs (`prefix`), which the output then continues from.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lctrain.models.context import document_ids as _document_ids


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, position_ids: torch.Tensor | None,
                          prefix: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, T, C], weight [C, k] (weight[:, -1] multiplies the current token), position_ids [B, T] or None (one
    document per row: no masking); prefix [B, k-1, C] are the inputs just before x that belong to x's first
    document (zeros when it starts there); document_ids [B, T] (`BatchContext.document_ids`, built once per batch)
    replace the ids derived from position_ids when given. Returns [B, T, C]."""
    batch, seqlen, channels = x.shape
    k = weight.shape[1]
    if prefix is None:
        prefix = x.new_zeros(batch, k - 1, channels)
    padded = torch.cat([prefix.to(x.dtype), x], dim=1)
    docs = document_ids
    if docs is None and position_ids is not None:
        docs = _document_ids(position_ids)
    if docs is not None:
        # prefix tokens count as part of the first document (they are zero when there is nothing to continue)
        docs_padded = torch.cat([docs[:, :1].expand(batch, k - 1), docs], dim=1)
    out = x * weight[:, -1]
    for shift in range(1, k):
        past = padded[:, k - 1 - shift:k - 1 - shift + seqlen]
        if docs is not None:
            same = docs_padded[:, k - 1 - shift:k - 1 - shift + seqlen] == docs
            past = past * same[..., None].to(past.dtype)
        out = out + past * weight[:, -1 - shift]
    return out


class _ConvSiLU(torch.autograd.Function):
    """silu(causal depthwise conv(x)) of whole rows (no prefix, no document mask), with a hand-written backward:
    in-place shifted multiply-adds both ways instead of autograd's padded copy, per-tap products and sums."""

    @staticmethod
    def forward(ctx, x, weight, activation):
        k = weight.shape[1]
        dtype = torch.promote_types(x.dtype, weight.dtype)  # as x * weight: fp32 weights keep a bf16 x in fp32
        xc, w = x.to(dtype), weight.to(dtype)
        y = xc * w[:, -1]
        for shift in range(1, min(k, x.shape[1] + 1)):
            y[:, shift:].addcmul_(xc[:, :-shift], w[:, -1 - shift])
        ctx.save_for_backward(x, weight, y)
        ctx.activation = activation
        return F.silu(y) if activation else y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        gy = torch.ops.aten.silu_backward(grad.to(y.dtype), y) if ctx.activation else grad.to(y.dtype)
        k = weight.shape[1]
        xc, w = x.to(y.dtype), weight.to(y.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = gy * w[:, -1]
            for shift in range(1, min(k, x.shape[1] + 1)):
                grad_x[:, :-shift].addcmul_(gy[:, shift:], w[:, -1 - shift])
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            acc = torch.promote_types(y.dtype, torch.float32)
            grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device)
            grad_w[:, -1] = (gy * xc).sum((0, 1), dtype=acc)
            for shift in range(1, min(k, x.shape[1] + 1)):
                grad_w[:, -1 - shift] = (gy[:, shift:] * xc[:, :-shift]).sum((0, 1), dtype=acc)
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None


class ShortConvolution(nn.Module):
    """Depthwise causal conv (kernel 4 by default) + optional SiLU, document-aware, with a decoding cache."""

    def __init__(self, channels: int, kernel_size: int = 4, activation: bool = True):
        super().__init__()
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.init_extra_()

    def init_extra_(self) -> None:
        bound = 1.0 / math.sqrt(self.kernel_size)  # fan-in of a depthwise kernel
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None, prefix: torch.Tensor | None = None,
                cache: dict | None = None, key: str = "conv", document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C]. With `cache`, continues from the cached inputs and stores the last k-1 inputs.
        position_ids None: every row is one document (no masking)."""
        if cache is not None:
            prefix = cache.get(key)
            position_ids = document_ids = None  # decoding: one document per row
            window = x if prefix is None else torch.cat([prefix, x], dim=1)
            cache[key] = _last_inputs(window, self.kernel_size - 1)
        if prefix is None and position_ids is None and document_ids is None:
            return _ConvSiLU.apply(x, self.weight, self.activation)  # whole rows: the fused path
        y = causal_depthwise_conv(x, self.weight, position_ids, prefix, document_ids)
        return F.silu(y) if self.activation else y


def _last_inputs(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[1] >= n:
        return x[:, -n:].detach()
    return torch.cat([x.new_zeros(x.shape[0], n - x.shape[1], x.shape[2]), x], dim=1).detach()
