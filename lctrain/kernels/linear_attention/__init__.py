"""`linear_attention`: (decayed) linear attention, Lightning-Attention-2 style, with three implementations.

`naive.py` (float64 token loop, the reference), `chunk.py` (chunked PyTorch, the CPU path) and the Triton
kernels (`triton_fwd.py`, `triton_bwd.py`, wrapped by `triton_chunk.py`; the GPU path).
"""
from __future__ import annotations

import torch

from lctrain.kernels.linear_attention.chunk import chunk_linear_attention
from lctrain.kernels.linear_attention.naive import naive_linear_attention
from lctrain.kernels.opaque import none_if_empty, opaque_op, recurrent_fake
from lctrain.kernels.utils import (check_cu_seqlens, check_qkv_tensors, check_triton_documents, compiling,
                                   device_cu_seqlens, host_cu_seqlens, resolve_backend)

__all__ = ["linear_attention", "naive_linear_attention", "chunk_linear_attention"]

_OP = "linear_attention"


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear attention with an optional per-head or per-token decay.

        S_t = exp(g_t) * S_{t-1} + k_t v_t^T,      o_t = scale * q_t^T S_t

    Args:
        q: queries `[B, T, H, K]`.
        k: keys `[B, T, H, K]`.
        v: values `[B, T, H, V]`.
        log_decay: g, None (no decay), per-head `[H]` or per-token `[B, T, H]`; values must be <= 0
            (checked on CPU tensors only, to avoid a device sync on CUDA).
        scale: output scale; defaults to `K ** -0.5`.
        initial_state: `[N, H, K, V]` state entering each sequence (zeros when None).
        output_final_state: also return the state after each sequence's last token.
        cu_seqlens: int32/int64 `[N+1]` offsets of packed documents along T (requires B == 1); each document
            starts from its own initial state. None means N = B independent sequences.
        backend: None (Triton on CUDA tensors, chunked PyTorch otherwise), "triton", "torch" or "naive".
            "triton" on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported.
        cu_seqlens_cpu: the same offsets as an int32 CPU tensor (the batch's host copy); everything
            shape-deciding reads it. Omitted with `cu_seqlens` given: one copy is made here (a device sync).

    Runs as the custom op `lctrain::linear_attention` (opaque to torch.compile).

    Returns:
        o `[B, T, H, V]` in q's dtype, and the final state `[N, H, K, V]` (float32; float64 for float64 inputs
        on the torch/naive backends) when `output_final_state`, else None.

    Gradients flow to q, k, v, log_decay and initial_state.
    """
    if cu_seqlens is not None and (not isinstance(cu_seqlens, torch.Tensor)
                                   or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        kind = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"{_OP}: cu_seqlens must be an int32 or int64 tensor [N+1], got {kind}")
    host = host_cu_seqlens(cu_seqlens, cu_seqlens_cpu, _OP)
    _validate(q, k, v, log_decay, scale, initial_state, host)
    chosen = resolve_backend(backend, q, k, v, op=_OP)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if chosen == "triton":
        check_triton_documents(_OP, q.shape[0] if host is None else host.numel() - 1, q.shape[2])
        _validate_for_triton(q)
    o, final = _linear_op(q, k, v, log_decay, initial_state, device_cu_seqlens(cu_seqlens, host, q.device), host,
                          float(scale), bool(output_final_state), chosen)
    return o, (none_if_empty(final) if output_final_state else None)


def _run(q, k, v, log_decay, initial_state, cu_seqlens, cu_seqlens_cpu, scale, output_final_state, backend):
    if backend == "naive":
        return naive_linear_attention(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)
    if backend == "torch":
        return chunk_linear_attention(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)
    from lctrain.kernels.linear_attention.triton_chunk import triton_linear_attention  # triton is optional

    return triton_linear_attention(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def _fake(q, k, v, log_decay, initial_state, cu_seqlens, cu_seqlens_cpu, scale, output_final_state, backend):
    return recurrent_fake(q, v, cu_seqlens_cpu, output_final_state, backend, q.shape[-1], v.shape[-1])


_linear_op = opaque_op(
    _OP, "Tensor q, Tensor k, Tensor v, Tensor? log_decay, Tensor? initial_state, Tensor? cu_seqlens, "
    "Tensor? cu_seqlens_cpu, float scale, bool output_final_state, str backend",
    differentiable=("q", "k", "v", "log_decay", "initial_state"), num_outputs=2, run=_run, fake=_fake)


def _validate(q, k, v, log_decay, scale, initial_state, cu_seqlens) -> int:
    """Raise a ValueError naming the bad argument; return the number of sequences N."""
    check_qkv_tensors(_OP, q, k, v)
    batch, length, heads, key_dim = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{_OP}: k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)} [B, T, H, K]")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{_OP}: v shape {tuple(v.shape)} must be [B, T, H, V] = [{batch}, {length}, {heads}, V]")
    if key_dim == 0 or v.shape[-1] == 0:
        raise ValueError(f"{_OP}: head dims must be >= 1, got K={key_dim}, V={v.shape[-1]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{_OP}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"{_OP}: scale must be a Python number or None, got {type(scale).__name__}")
    if log_decay is not None:
        if not isinstance(log_decay, torch.Tensor) or log_decay.shape not in ((heads,), (batch, length, heads)):
            shape = tuple(log_decay.shape) if isinstance(log_decay, torch.Tensor) else type(log_decay).__name__
            raise ValueError(f"{_OP}: log_decay must be None, [H] = [{heads}] or [B, T, H] = "
                             f"[{batch}, {length}, {heads}], got {shape}")
        if not log_decay.is_floating_point():
            raise ValueError(f"{_OP}: log_decay must be floating point, got {log_decay.dtype}")
        if log_decay.device.type == "cpu" and not compiling() and bool((log_decay > 0).any()):
            raise ValueError(f"{_OP}: log_decay values must be <= 0 (log of a decay in (0, 1]), "
                             f"got max {log_decay.max().item():.4g}")
    num_seqs = check_cu_seqlens(cu_seqlens, batch, length, _OP)  # the host offsets
    if initial_state is not None:
        expected = (num_seqs, heads, key_dim, v.shape[-1])
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != expected:
            is_tensor = isinstance(initial_state, torch.Tensor)
            shape = tuple(initial_state.shape) if is_tensor else type(initial_state).__name__
            raise ValueError(f"{_OP}: initial_state must be [N, H, K, V] = {list(expected)}, got {shape}")
    return num_seqs


def _validate_for_triton(q: torch.Tensor) -> None:
    from lctrain.kernels.linear_attention.triton_config import MAX_KEY_DIM

    if q.dtype == torch.float64:
        raise ValueError(f"{_OP}: backend='triton' does not support float64; use backend='torch' or 'naive'")
    if q.shape[-1] > MAX_KEY_DIM:
        raise ValueError(f"{_OP}: backend='triton' supports key dim K <= {MAX_KEY_DIM}, got K={q.shape[-1]}")
