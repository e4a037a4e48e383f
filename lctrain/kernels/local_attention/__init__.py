"""`local_attention`: sliding-window softmax attention with attention sinks, per-head spans, GQA and packed
documents, with three implementations.

`naive.py` (dense float64 mask, the reference), `chunk.py` (blocked PyTorch, O(T * (window + sink)), the CPU
path) and the Triton flash-attention-style kernels (`triton_fwd.py`, `triton_bwd.py`, wrapped by
`triton_local.py`; the GPU path), which skip every key block outside the band and the sink.
"""
from __future__ import annotations

import torch

from lctrain.kernels.local_attention.chunk import chunk_local_attention
from lctrain.kernels.local_attention.naive import naive_local_attention
from lctrain.kernels.opaque import opaque_op
from lctrain.kernels.utils import (check_attention_qkv, check_cu_seqlens, check_triton_documents, compiling,
                                   device_cu_seqlens, host_cu_seqlens, resolve_backend)

__all__ = ["local_attention", "naive_local_attention", "chunk_local_attention"]

_OP = "local_attention"
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | torch.Tensor,
    sink: int | torch.Tensor = 0,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax attention restricted to a sliding window plus the first `sink` tokens of each document.

    Query i attends key j iff j <= i, both are in the same document, and (i - j < window or
    j - doc_start < sink). `window = 1` attends to the token itself (plus the sink); a window of at least the
    sequence length is full causal attention.

    Args:
        q: queries `[B, T, H, D]`.
        k: keys `[B, T, Hkv, D]`; Hkv divides H and query head h reads kv head h // (H / Hkv) (GQA).
        v: values `[B, T, Hkv, Dv]`.
        window: int >= 1, or an integer tensor `[H]` of per-head windows (each >= 1).
        sink: int >= 0, or an integer tensor `[H]` of per-head sink lengths (each >= 0).
        scale: multiplies q.k before the softmax; defaults to `D ** -0.5`.
        cu_seqlens: int32/int64 `[N+1]` offsets of packed documents along T (requires B == 1); attention never
            crosses a document boundary and the sink is counted from each document's start.
        backend: None (Triton on CUDA tensors, blocked PyTorch otherwise), "triton", "torch" or "naive".
            "triton" on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported.
        cu_seqlens_cpu: the same offsets as an int32 CPU tensor (the batch's host copy); everything
            shape-deciding reads it. Omitted with `cu_seqlens` given: one copy is made here (a device sync).

    Runs as the custom op `lctrain::local_attention` (opaque to torch.compile).

    Returns:
        o `[B, T, H, Dv]` in q's dtype. Gradients flow to q, k and v.
    """
    host = host_cu_seqlens(cu_seqlens, cu_seqlens_cpu, _OP)
    _validate(q, k, v, window, sink, scale, host)
    chosen = resolve_backend(backend, q, k, v, op=_OP)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if chosen == "triton":
        check_triton_documents(_OP, q.shape[0] if host is None else host.numel() - 1, q.shape[2])
        _validate_for_triton(q, v)
    window_t, window_i = (window, 0) if isinstance(window, torch.Tensor) else (None, window)
    sink_t, sink_i = (sink, 0) if isinstance(sink, torch.Tensor) else (None, sink)
    return _local_op(q, k, v, device_cu_seqlens(cu_seqlens, host, q.device), host, window_t, window_i, sink_t,
                     sink_i, float(scale), chosen)[0]


def _run(q, k, v, cu_seqlens, cu_seqlens_cpu, window_t, window_i, sink_t, sink_i, scale, backend):
    window = window_t if window_t is not None else window_i
    sink = sink_t if sink_t is not None else sink_i
    if backend == "naive":
        return (naive_local_attention(q, k, v, window, sink, scale, cu_seqlens),)
    if backend == "torch":
        return (chunk_local_attention(q, k, v, window, sink, scale, cu_seqlens),)
    from lctrain.kernels.local_attention.triton_local import triton_local_attention  # triton is optional

    return (triton_local_attention(q, k, v, window, sink, scale, cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu),)


def _fake(q, k, v, cu_seqlens, cu_seqlens_cpu, window_t, window_i, sink_t, sink_i, scale, backend):
    return (q.new_empty(*q.shape[:3], v.shape[-1]),)


_local_op = opaque_op(
    _OP, "Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, Tensor? cu_seqlens_cpu, Tensor? window_t, int window_i, "
    "Tensor? sink_t, int sink_i, float scale, str backend",
    differentiable=("q", "k", "v"), num_outputs=1, run=_run, fake=_fake)


def _validate_span(name: str, span, heads: int, minimum: int) -> None:
    if isinstance(span, bool) or not isinstance(span, (int, torch.Tensor)):
        raise ValueError(f"{_OP}: {name} must be an int or an integer tensor [H], got {type(span).__name__}")
    if isinstance(span, int):
        if span < minimum:
            raise ValueError(f"{_OP}: {name}={span} must be >= {minimum}")
        return
    if span.dtype not in _INT_DTYPES or tuple(span.shape) != (heads,):
        raise ValueError(f"{_OP}: {name} tensor must be integer [H] = [{heads}], got {span.dtype} "
                         f"{list(span.shape)}")
    if span.device.type == "cpu" and not compiling() and bool((span < minimum).any()):
        raise ValueError(f"{_OP}: every {name} value must be >= {minimum}, got {span.tolist()}")


def _validate(q, k, v, window, sink, scale, cu_seqlens) -> None:
    """Raise a ValueError naming the bad argument."""
    check_attention_qkv(q, k, v, _OP)
    batch, length, heads, _ = q.shape
    _validate_span("window", window, heads, 1)
    _validate_span("sink", sink, heads, 0)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"{_OP}: scale must be a Python number or None, got {type(scale).__name__}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            kind = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
            raise ValueError(f"{_OP}: cu_seqlens must be an int32 or int64 tensor [N+1], got {kind}")
    check_cu_seqlens(cu_seqlens, batch, length, _OP)


def _validate_for_triton(q: torch.Tensor, v: torch.Tensor) -> None:
    from lctrain.kernels.local_attention.triton_config import MAX_HEAD_DIM

    if q.dtype == torch.float64:
        raise ValueError(f"{_OP}: backend='triton' does not support float64; use backend='torch' or 'naive'")
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: backend='triton' supports head dims D, Dv <= {MAX_HEAD_DIM}, "
                         f"got D={q.shape[-1]}, Dv={v.shape[-1]}")
