"""`titans_linear_memory`: the Titans neural memory (Behrouz, Zhong & Mirrokni, 2024) with a linear memory,
trained online by gradient descent with momentum and weight decay, chunk-parallel.

`naive.py` (float64 token loop, the reference), `chunk.py` (chunked PyTorch, the CPU path) and the Triton
kernels (`triton_fwd.py`, `triton_bwd.py`, wrapped by `triton_chunk.py`; the GPU path).
"""
from __future__ import annotations

import torch

from lctrain.kernels.titans_memory.chunk import chunk_titans_linear_memory
from lctrain.kernels.titans_memory.naive import naive_titans_linear_memory
from lctrain.kernels.opaque import none_if_empty, opaque_op
from lctrain.kernels.utils import (check_cu_seqlens, check_qkv_tensors, compiling, device_cu_seqlens, host_cu_seqlens,
                                   resolve_backend, triton_or_torch)

__all__ = ["titans_linear_memory", "naive_titans_linear_memory", "chunk_titans_linear_memory"]

_OP = "titans_linear_memory"


def titans_linear_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    theta: torch.Tensor,
    chunk_size: int = 16,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Titans linear memory: per head a memory M `[K, V]` and a momentum S `[K, V]`.

        e_t = M0^T k_t - v_t,   u_t = k_t e_t^T       (surprise against the chunk-start memory M0)
        S_t = eta_t S_{t-1} - theta_t u_t
        M_t = (1 - alpha_t) M_{t-1} + S_t
        o_t = q_t^T M_t

    Args:
        q: queries `[B, T, H, K]`.
        k: keys `[B, T, H, K]` (usually L2-normalised: theta is then a step size on a well-scaled loss).
        v: values `[B, T, H, V]`.
        alpha: forgetting gate `[B, T, H]` in [0, 1].
        eta: momentum decay `[B, T, H]` in [0, 1].
        theta: learning rate `[B, T, H]` in [0, 1].
            (Ranges are checked on CPU tensors only, to avoid a device sync on CUDA.)
        chunk_size: tokens whose surprise is measured against the same memory M0 (the memory entering their
            chunk; chunks are counted from each sequence start). 1 gives the fully sequential update.
        initial_state: `(M, S)`, each `[N, H, K, V]`, entering each sequence (zeros when None).
        output_final_state: also return `(M, S)` after each sequence's last token.
        backend: None (Triton on CUDA tensors, chunked PyTorch otherwise), "triton", "torch" or "naive".
        cu_seqlens: int32/int64 `[N+1]` offsets of packed documents along T (requires B == 1); each document
            starts from its own initial state and its own first chunk. None means N = B sequences.
        cu_seqlens_cpu: the same offsets as an int32 CPU tensor (the batch's host copy); everything
            shape-deciding reads it. Omitted with `cu_seqlens` given: one copy is made here (a device sync).

    Runs as the custom op `lctrain::titans_linear_memory` (opaque to torch.compile).

    Returns:
        o `[B, T, H, V]` in q's dtype, and `(M, S)` each `[N, H, K, V]` (float32; float64 for float64 inputs on
        the torch/naive backends) when `output_final_state`, else None.

    Gradients flow to q, k, v, alpha, eta, theta and initial_state.
    """
    host = host_cu_seqlens(cu_seqlens, cu_seqlens_cpu, _OP)
    _validate(q, k, v, alpha, eta, theta, chunk_size, initial_state, host)
    chosen = resolve_backend(backend, q, k, v, op=_OP)
    if chosen == "triton":  # the Triton kernels are optional: without them CUDA tensors take the PyTorch path
        chosen = triton_or_torch(_OP, "lctrain.kernels.titans_memory.triton_chunk", backend)
    if chosen == "triton":
        _validate_for_triton(q, v, chunk_size)
    memory, momentum = (None, None) if initial_state is None else initial_state
    o, final_memory, final_momentum = _titans_op(
        q, k, v, alpha, eta, theta, memory, momentum, device_cu_seqlens(cu_seqlens, host, q.device), host,
        chunk_size, bool(output_final_state), chosen)
    if not output_final_state:
        return o, None
    return o, (none_if_empty(final_memory), none_if_empty(final_momentum))


def _run(q, k, v, alpha, eta, theta, memory, momentum, cu_seqlens, cu_seqlens_cpu, chunk_size, output_final_state,
         backend):
    initial_state = None if memory is None else (memory, momentum)
    args = (q, k, v, alpha, eta, theta, chunk_size, initial_state, output_final_state, cu_seqlens)
    if backend == "naive":
        o, final = naive_titans_linear_memory(*args)
    elif backend == "torch":
        o, final = chunk_titans_linear_memory(*args)
    else:
        from lctrain.kernels.titans_memory.triton_chunk import triton_titans_linear_memory

        o, final = triton_titans_linear_memory(*args, cu_seqlens_cpu=cu_seqlens_cpu)
    return (o, None, None) if final is None else (o, *final)


def _fake(q, k, v, alpha, eta, theta, memory, momentum, cu_seqlens, cu_seqlens_cpu, chunk_size, output_final_state,
          backend):
    batch, length, heads, key_dim = q.shape
    o = q.new_empty(batch, length, heads, v.shape[-1])
    if not output_final_state:
        return o, q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    num_seqs = batch if cu_seqlens_cpu is None else cu_seqlens_cpu.shape[0] - 1
    state_dtype = torch.float64 if q.dtype == torch.float64 and backend != "triton" else torch.float32
    shape = (num_seqs, heads, key_dim, v.shape[-1])
    return o, q.new_empty(shape, dtype=state_dtype), q.new_empty(shape, dtype=state_dtype)


_titans_op = opaque_op(
    _OP, "Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor eta, Tensor theta, Tensor? memory, Tensor? momentum, "
    "Tensor? cu_seqlens, Tensor? cu_seqlens_cpu, int chunk_size, bool output_final_state, str backend",
    differentiable=("q", "k", "v", "alpha", "eta", "theta", "memory", "momentum"), num_outputs=3, run=_run,
    fake=_fake)


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _validate(q, k, v, alpha, eta, theta, chunk_size, initial_state, cu_seqlens) -> int:
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
    for name, gate in (("alpha", alpha), ("eta", eta), ("theta", theta)):
        if not isinstance(gate, torch.Tensor) or tuple(gate.shape) != (batch, length, heads):
            raise ValueError(f"{_OP}: {name} must be [B, T, H] = [{batch}, {length}, {heads}], got {_shape(gate)}")
        if not gate.is_floating_point():
            raise ValueError(f"{_OP}: {name} must be floating point, got {gate.dtype}")
        if gate.device.type == "cpu" and not compiling() and gate.numel() and bool(((gate < 0) | (gate > 1)).any()):
            raise ValueError(f"{_OP}: {name} values must lie in [0, 1], got min {gate.min().item():.4g} "
                             f"max {gate.max().item():.4g}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{_OP}: chunk_size must be a positive int, got {chunk_size!r}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            kind = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
            raise ValueError(f"{_OP}: cu_seqlens must be an int32 or int64 tensor [N+1], got {kind}")
    num_seqs = check_cu_seqlens(cu_seqlens, batch, length, _OP)
    if initial_state is not None:
        expected = (num_seqs, heads, key_dim, v.shape[-1])
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError(f"{_OP}: initial_state must be None or a pair (M, S), got {type(initial_state).__name__}")
        for name, x in zip(("M", "S"), initial_state):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != expected:
                raise ValueError(f"{_OP}: initial_state {name} must be [N, H, K, V] = {list(expected)}, "
                                 f"got {_shape(x)}")
    return num_seqs


def _validate_for_triton(q: torch.Tensor, v: torch.Tensor, chunk_size: int) -> None:
    from lctrain.kernels.titans_memory.triton_config import MAX_CHUNK, MAX_KEY_DIM

    if q.dtype == torch.float64:
        raise ValueError(f"{_OP}: backend='triton' does not support float64; use backend='torch' or 'naive'")
    if q.shape[-1] > MAX_KEY_DIM:
        raise ValueError(f"{_OP}: backend='triton' supports key dim K <= {MAX_KEY_DIM}, got K={q.shape[-1]}")
    if chunk_size > MAX_CHUNK:
        raise ValueError(f"{_OP}: backend='triton' supports chunk_size <= {MAX_CHUNK}, got {chunk_size}")
