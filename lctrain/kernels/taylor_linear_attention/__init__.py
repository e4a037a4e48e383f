"""`taylor_linear_attention`: BASED's linear attention with the second-order Taylor feature map.

`naive.py` (float64 token loop, the reference), `chunk.py` (chunked PyTorch: polynomial scores inside a chunk,
expanded feature state across chunks; the CPU path) and the Triton kernels (`triton_fwd.py`, `triton_bwd.py`,
wrapped by `triton_chunk.py`; the GPU path). The state layout is documented in `common.py`.
"""
from __future__ import annotations

import torch

from lctrain.kernels.taylor_linear_attention.chunk import chunk_taylor_linear_attention
from lctrain.kernels.taylor_linear_attention.common import MAX_FEATURE_DIM, state_rows
from lctrain.kernels.taylor_linear_attention.naive import naive_taylor_linear_attention
from lctrain.kernels.opaque import none_if_empty, opaque_op, recurrent_fake
from lctrain.kernels.utils import (check_cu_seqlens, check_qkv_tensors, check_triton_documents, device_cu_seqlens,
                                   host_cu_seqlens, resolve_backend)

__all__ = ["taylor_linear_attention", "naive_taylor_linear_attention", "chunk_taylor_linear_attention",
           "state_rows"]

_OP = "taylor_linear_attention"


def taylor_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention whose score is the 2nd-order Taylor expansion of exp (BASED).

        x_ts = scale * (q_t . k_s),   score = 1 + x + x^2 / 2   (> 0 for every x)
        o_t  = sum_{s<=t} score_ts v_s  /  (sum_{s<=t} score_ts + eps)     (without the division if not normalize)

    Args:
        q: queries `[B, T, H, D]` (feature dim D <= 32: the state has 1 + D + D^2 rows).
        k: keys `[B, T, H, D]`.
        v: values `[B, T, H, V]`.
        scale: inside the score; defaults to `D ** -0.5`, so x is BASED's q.k / sqrt(d).
        normalize: divide by the running sum of scores (BASED's normaliser).
        eps: added to the normaliser.
        initial_state: `[N, H, 1 + D + D^2, V + 1]` state entering each sequence (layout in
            `taylor_linear_attention.common`); zeros when None.
        output_final_state: also return the state after each sequence's last token.
        cu_seqlens: int32/int64 `[N+1]` offsets of packed documents along T (requires B == 1).
        backend: None (Triton on CUDA tensors, chunked PyTorch otherwise), "triton", "torch" or "naive".
        cu_seqlens_cpu: the same offsets as an int32 CPU tensor (the batch's host copy); everything
            shape-deciding reads it. Omitted with `cu_seqlens` given: one copy is made here (a device sync).

    Runs as the custom op `lctrain::taylor_linear_attention` (opaque to torch.compile).

    Returns:
        o `[B, T, H, V]` in q's dtype, and the final state `[N, H, 1 + D + D^2, V + 1]` (fp32; float64 for
        float64 inputs on the torch/naive backends) when `output_final_state`, else None.

    Gradients flow to q, k, v and initial_state.
    """
    host = host_cu_seqlens(cu_seqlens, cu_seqlens_cpu, _OP)
    _validate(q, k, v, scale, normalize, eps, initial_state, host)
    chosen = resolve_backend(backend, q, k, v, op=_OP)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if chosen == "triton":
        check_triton_documents(_OP, q.shape[0] if host is None else host.numel() - 1, q.shape[2])
        if q.dtype == torch.float64:
            raise ValueError(f"{_OP}: backend='triton' does not support float64; use backend='torch' or 'naive'")
        from lctrain.kernels.taylor_linear_attention.triton_chunk import MAX_TRITON_FEATURE_DIM

        if q.shape[-1] > MAX_TRITON_FEATURE_DIM:
            raise ValueError(f"{_OP}: backend='triton' supports feature dim D <= {MAX_TRITON_FEATURE_DIM}, got "
                             f"D={q.shape[-1]}; use backend='torch' (D <= {MAX_FEATURE_DIM})")
    o, final = _taylor_op(q, k, v, initial_state, device_cu_seqlens(cu_seqlens, host, q.device), host, float(scale),
                          normalize, float(eps), bool(output_final_state), chosen)
    return o, (none_if_empty(final) if output_final_state else None)


def _run(q, k, v, initial_state, cu_seqlens, cu_seqlens_cpu, scale, normalize, eps, output_final_state, backend):
    if backend == "naive":
        y, final = naive_taylor_linear_attention(q, k, v, scale, initial_state, cu_seqlens)
    elif backend == "torch":
        y, final = chunk_taylor_linear_attention(q, k, v, scale, initial_state, cu_seqlens)
    else:
        from lctrain.kernels.taylor_linear_attention.triton_chunk import triton_taylor_linear_attention

        y, final = triton_taylor_linear_attention(q, k, v, scale, initial_state, cu_seqlens)
    value_dim = v.shape[-1]
    o = y[..., :value_dim] / (y[..., value_dim:] + eps) if normalize else y[..., :value_dim]
    state_dtype = torch.float64 if q.dtype == torch.float64 and backend != "triton" else torch.float32
    return o.to(q.dtype), (final.to(state_dtype) if output_final_state else None)


def _fake(q, k, v, initial_state, cu_seqlens, cu_seqlens_cpu, scale, normalize, eps, output_final_state, backend):
    return recurrent_fake(q, v, cu_seqlens_cpu, output_final_state, backend, state_rows(q.shape[-1]),
                          v.shape[-1] + 1)


_taylor_op = opaque_op(
    _OP, "Tensor q, Tensor k, Tensor v, Tensor? initial_state, Tensor? cu_seqlens, Tensor? cu_seqlens_cpu, "
    "float scale, bool normalize, float eps, bool output_final_state, str backend",
    differentiable=("q", "k", "v", "initial_state"), num_outputs=2, run=_run, fake=_fake)


def _validate(q, k, v, scale, normalize, eps, initial_state, cu_seqlens) -> None:
    """Raise a ValueError naming the bad argument."""
    check_qkv_tensors(_OP, q, k, v)
    batch, length, heads, feature_dim = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{_OP}: k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)} [B, T, H, D]")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{_OP}: v shape {tuple(v.shape)} must be [B, T, H, V] = [{batch}, {length}, {heads}, V]")
    if not 1 <= feature_dim <= MAX_FEATURE_DIM:
        raise ValueError(f"{_OP}: feature dim D={feature_dim} must be in [1, {MAX_FEATURE_DIM}] "
                         f"(the state has 1 + D + D^2 rows)")
    if v.shape[-1] == 0:
        raise ValueError(f"{_OP}: value dim V must be >= 1")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{_OP}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"{_OP}: scale must be a Python number or None, got {type(scale).__name__}")
    if not isinstance(normalize, bool):
        raise ValueError(f"{_OP}: normalize must be True or False, got {normalize!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{_OP}: eps must be a number >= 0, got {eps!r}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            kind = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
            raise ValueError(f"{_OP}: cu_seqlens must be an int32 or int64 tensor [N+1], got {kind}")
    num_seqs = check_cu_seqlens(cu_seqlens, batch, length, _OP)
    if initial_state is not None:
        expected = (num_seqs, heads, state_rows(feature_dim), v.shape[-1] + 1)
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != expected:
            shape = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
            raise ValueError(f"{_OP}: initial_state must be [N, H, 1 + D + D^2, V + 1] = {list(expected)}, "
                             f"got {shape}")
