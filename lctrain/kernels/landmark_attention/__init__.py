"""`landmark_attention`: blockwise grouped-softmax attention with landmark tokens (Mohtashami & Jaggi, 2023,
"Landmark Attention: Random-Access Infinite Context Length for Transformers").

`naive.py` (dense float64 weights, the reference), `chunk.py` (blocked PyTorch, the CPU path) and the Triton
kernels (`triton_fwd.py`, `triton_bwd.py`, wrapped by `triton_blocks.py`; the GPU path).
"""
from __future__ import annotations

import torch

from lctrain.kernels.landmark_attention.chunk import chunk_landmark_attention
from lctrain.kernels.landmark_attention.common import landmark_mask
from lctrain.kernels.landmark_attention.naive import naive_landmark_attention
from lctrain.kernels.opaque import opaque_op
from lctrain.kernels.utils import (check_cu_seqlens, check_qkv_tensors, check_triton_documents, device_cu_seqlens,
                                   host_cu_seqlens, resolve_backend, triton_or_torch)

__all__ = ["landmark_attention", "naive_landmark_attention", "chunk_landmark_attention", "landmark_mask"]

_OP = "landmark_attention"


def landmark_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    backend: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention through landmark tokens.

    The sequence is cut into blocks of `block_size` tokens (from each sequence start); the last token of every
    complete block is its landmark. For query i in block b, with s_ij = scale q_i . k_j:
      * one softmax over {non-landmark j <= i in block b} and {landmark of each earlier block c} gives the
        own-block weights and a gate g_ic per earlier block;
      * inside each earlier block c: w_ij = g_ic softmax over block c's non-landmark tokens of s_ij;
      * o_i = sum_j w_ij v_j; landmark tokens never contribute values.
    A landmark query follows the same rule (its group is the other tokens of its block and the earlier
    landmarks), so every token gets a well-defined output.

    Args:
        q, k: `[B, T, H, D]`.  v: `[B, T, H, V]`.
        block_size: tokens per block including the landmark (>= 2).
        scale: score scale; defaults to `D ** -0.5`.
        backend: None (Triton on CUDA tensors when the kernels cover the shapes, blocked PyTorch otherwise),
            "triton" (head dims <= 128, block_size <= 64, no float64), "torch" or "naive".
        cu_seqlens: int32/int64 `[N+1]` offsets of packed documents along T (requires B == 1): attention stays
            inside each document and blocks restart at each document start. None: every row is one sequence.
        cu_seqlens_cpu: the same offsets as an int32 CPU tensor (the batch's host copy); everything
            shape-deciding reads it. Omitted with `cu_seqlens` given: one copy is made here (a device sync).

    Runs as the custom op `lctrain::landmark_attention` (opaque to torch.compile).

    Returns:
        o `[B, T, H, V]` in q's dtype. Gradients flow to q, k and v.
    """
    host = host_cu_seqlens(cu_seqlens, cu_seqlens_cpu, _OP)
    _validate(q, k, v, block_size, scale, host)
    chosen = resolve_backend(backend, q, k, v, op=_OP)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if chosen == "triton":  # the Triton kernels are optional: without them CUDA tensors take the PyTorch path
        chosen = triton_or_torch(_OP, "lctrain.kernels.landmark_attention.triton_blocks", backend)
    if chosen == "triton":
        check_triton_documents(_OP, q.shape[0] if host is None else host.numel() - 1, q.shape[2])
        unsupported = _triton_unsupported(q, v, block_size)
        if unsupported is not None:
            if backend == "triton":
                raise ValueError(f"{_OP}: {unsupported}; use backend='torch' or 'naive'")
            chosen = "torch"  # auto: shapes outside the kernels
    return _landmark_op(q, k, v, device_cu_seqlens(cu_seqlens, host, q.device), host, block_size, float(scale),
                        chosen)[0]


def _run(q, k, v, cu_seqlens, cu_seqlens_cpu, block_size, scale, backend):
    if backend == "naive":
        return (naive_landmark_attention(q, k, v, block_size, scale, cu_seqlens),)
    if backend == "torch":
        return (chunk_landmark_attention(q, k, v, block_size, scale, cu_seqlens),)
    from lctrain.kernels.landmark_attention.triton_blocks import triton_landmark_attention

    return (triton_landmark_attention(q, k, v, block_size, scale, cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu),)


def _fake(q, k, v, cu_seqlens, cu_seqlens_cpu, block_size, scale, backend):
    return (q.new_empty(*q.shape[:3], v.shape[-1]),)


_landmark_op = opaque_op(
    _OP, "Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, Tensor? cu_seqlens_cpu, int block_size, float scale, "
    "str backend", differentiable=("q", "k", "v"), num_outputs=1, run=_run, fake=_fake)


def _validate(q, k, v, block_size, scale, cu_seqlens) -> None:
    """Raise a ValueError naming the bad argument."""
    check_qkv_tensors(_OP, q, k, v)
    batch, length, heads, _ = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{_OP}: k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)} [B, T, H, D]")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{_OP}: v shape {tuple(v.shape)} must be [B, T, H, V] = [{batch}, {length}, {heads}, V]")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"{_OP}: head dims must be >= 1, got D={q.shape[-1]}, V={v.shape[-1]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{_OP}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"{_OP}: block_size must be an int >= 2 (tokens per block including its landmark), "
                         f"got {block_size!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"{_OP}: scale must be a Python number or None, got {type(scale).__name__}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            kind = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
            raise ValueError(f"{_OP}: cu_seqlens must be an int32 or int64 tensor [N+1], got {kind}")
    check_cu_seqlens(cu_seqlens, batch, length, _OP)


def _triton_unsupported(q: torch.Tensor, v: torch.Tensor, block_size: int) -> str | None:
    """Why the Triton kernels cannot run these inputs, or None when they can."""
    from lctrain.kernels.landmark_attention.triton_config import MAX_BLOCK_SIZE, MAX_HEAD_DIM

    if q.dtype == torch.float64:
        return "backend='triton' does not support float64"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"backend='triton' supports head dims <= {MAX_HEAD_DIM}, got D={q.shape[-1]}, V={v.shape[-1]}"
    if block_size > MAX_BLOCK_SIZE:
        return f"backend='triton' supports block_size <= {MAX_BLOCK_SIZE}, got {block_size}"
    return None
