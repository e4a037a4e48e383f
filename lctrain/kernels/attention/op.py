"""`lctrain::attention_fwd` / `lctrain::attention_bwd`: the attention op as two `torch.library` custom ops with a
fake implementation and autograd, so `torch.compile(fullgraph=True)` sees one opaque node per direction.

Host values (spans, offsets, document offsets as the CPU tensor `cu_seqlens_cpu`) are plain arguments: the real
implementation reads them without touching the device, and a compiled graph holds no value guards on them.
No `from __future__ import annotations` here: the schema is inferred from the annotations.
"""
from typing import List, Optional, Tuple

import torch

from lctrain.kernels.attention.blockwise import blockwise_backward, blockwise_forward, compute_dtype
from lctrain.kernels.attention.pattern import Pattern


def make_pattern(causal: bool, window: List[int], sink: List[int], scale: float, q_offset: int, k_offset: int,
                 cu_seqlens_cpu: Optional[torch.Tensor]) -> Pattern:
    offsets = None if cu_seqlens_cpu is None else tuple(cu_seqlens_cpu.tolist())   # a CPU tensor: no sync
    return Pattern(bool(causal), tuple(window), tuple(sink), float(scale), int(q_offset), int(k_offset), offsets)


@torch.library.custom_op("lctrain::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                  cu_seqlens_cpu: Optional[torch.Tensor], causal: bool, window: List[int], sink: List[int],
                  scale: float, q_offset: int, k_offset: int, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o `[B, Tq, H, Dv]` in q's dtype, lse `[B, H, Tq]` float32, float64 for float64 inputs)."""
    pattern = make_pattern(causal, window, sink, scale, q_offset, k_offset, cu_seqlens_cpu)
    if backend == "triton":
        from lctrain.kernels.attention.triton_attention import triton_forward  # triton is optional
        return triton_forward(q, k, v, pattern, cu_seqlens)
    with torch.autocast(q.device.type, enabled=False):  # the torch path accumulates in fp32 by itself
        return blockwise_forward(q, k, v, pattern, cu_seqlens)


@attention_fwd.register_fake
def _(q, k, v, cu_seqlens, cu_seqlens_cpu, causal, window, sink, scale, q_offset, k_offset, backend):
    batch, tq, heads, _ = q.shape
    return (q.new_empty(batch, tq, heads, v.shape[-1]),
            q.new_empty(batch, heads, tq, dtype=compute_dtype(q.dtype)))


@torch.library.custom_op("lctrain::attention_bwd", mutates_args=())
def attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                  grad_o: torch.Tensor, grad_lse: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                  cu_seqlens_cpu: Optional[torch.Tensor], causal: bool, window: List[int], sink: List[int],
                  scale: float, q_offset: int, k_offset: int,
                  backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the compute dtype (float32, float64 for float64 inputs), so SP can sum blocks exactly."""
    pattern = make_pattern(causal, window, sink, scale, q_offset, k_offset, cu_seqlens_cpu)
    if backend == "triton":
        from lctrain.kernels.attention.triton_attention import triton_backward
        return triton_backward(q, k, v, o, lse, grad_o, grad_lse, pattern, cu_seqlens)
    with torch.autocast(q.device.type, enabled=False):
        return blockwise_backward(q, k, v, o, lse, grad_o, grad_lse, pattern, cu_seqlens)


@attention_bwd.register_fake
def _(q, k, v, o, lse, grad_o, grad_lse, cu_seqlens, cu_seqlens_cpu, causal, window, sink, scale, q_offset,
      k_offset, backend):
    dtype = compute_dtype(q.dtype)
    return q.new_empty(q.shape, dtype=dtype), k.new_empty(k.shape, dtype=dtype), v.new_empty(v.shape, dtype=dtype)


_HOST_ARGS = ("cu_seqlens", "cu_seqlens_cpu", "causal", "window", "sink", "scale", "q_offset", "k_offset", "backend")


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    ctx.host = inputs[3:]
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    cu_seqlens, *rest = ctx.host
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    dq, dk, dv = attention_bwd(q, k, v, o, lse, grad_o.contiguous(), grad_lse, cu_seqlens, *rest)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)) + (None,) * len(_HOST_ARGS)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
