"""Gated DeltaNet (gated delta rule) sequence mixing: token-by-token reference, chunked PyTorch and Triton."""
from __future__ import annotations

import torch

from lctrain.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule
from lctrain.kernels.gated_delta_rule.naive import naive_gated_delta_rule
from lctrain.kernels.opaque import none_if_empty, opaque_op, recurrent_fake
from lctrain.kernels.utils import check_cu_seqlens, device_cu_seqlens, host_cu_seqlens, resolve_backend

__all__ = ["gated_delta_rule", "naive_gated_delta_rule", "chunk_gated_delta_rule"]

_OP = "gated_delta_rule"


def _validate(q, k, v, g, beta, initial_state, cu_seqlens) -> int:
    """Check shapes, dtypes and devices (cu_seqlens: the host offsets); return the number of sequences N."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{_OP}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{_OP}: {name} must be floating point, got dtype {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{_OP}: {name} is on {x.device} but q is on {q.device}; all inputs must share a device")
    if q.dim() != 4:
        raise ValueError(f"{_OP}: q must be [B, T, H, K], got shape {tuple(q.shape)}")
    batch, seq_len, heads, key_dim = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{_OP}: k must have q's shape {tuple(q.shape)} [B, T, H, K], got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{_OP}: v must be [B, T, H, V] = [{batch}, {seq_len}, {heads}, V], got {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != q.shape[:3]:
            raise ValueError(f"{_OP}: {name} must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(x.shape)}")
    num_seqs = check_cu_seqlens(cu_seqlens, batch, seq_len, _OP)
    if initial_state is not None:
        expected = (num_seqs, heads, key_dim, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"{_OP}: initial_state must be [N, H, K, V] = {expected}, got "
                             f"{tuple(initial_state.shape)}")
        if initial_state.device != q.device:
            raise ValueError(f"{_OP}: initial_state is on {initial_state.device} but q is on {q.device}")
    return num_seqs


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                     backend: str | None = None, cu_seqlens_cpu: torch.Tensor | None = None):
    """Gated DeltaNet: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = scale q_t^T S_t.

    q and k are used as given (callers usually L2-normalise them; this op does not).

    Args:
        q: `[B, T, H, K]` queries.
        k: `[B, T, H, K]` keys.
        v: `[B, T, H, V]` values.
        g: `[B, T, H]` log-decay per token and head (<= 0).
        beta: `[B, T, H]` write strength in (0, 1).
        scale: multiplies q^T S; defaults to K ** -0.5.
        initial_state: `[N, H, K, V]` state entering each sequence (fp32 recommended), or None for zeros.
        output_final_state: also return the state after each sequence's last token.
        cu_seqlens: int32 `[N+1]` offsets of packed documents along T (needs B == 1); each document starts
            from its own initial state. None: N = B sequences of length T.
        backend: None (Triton on CUDA, chunked PyTorch otherwise), "triton", "torch" or "naive".
        cu_seqlens_cpu: the same offsets as an int32 CPU tensor (the batch's host copy); everything
            shape-deciding reads it. Omitted with `cu_seqlens` given: one copy is made here (a device sync).

    Runs as the custom op `lctrain::gated_delta_rule` (opaque to torch.compile).

    Returns:
        o: `[B, T, H, V]` in q's dtype.
        final_state: `[N, H, K, V]` fp32 (float64 for float64 inputs on the torch/naive paths), or None
            unless `output_final_state`.

    Gradients flow to q, k, v, g, beta and initial_state.

    Precision: "naive" and "torch" compute in float64 for float64 inputs and in fp32 otherwise. "triton"
    takes fp32/bf16/fp16 q, k, v (K <= 128) and carries the recurrent state and every accumulation in fp32;
    with bf16/fp16 inputs its matrix products multiply bf16/fp16 tiles (fp32 accumulation) and the per-chunk
    tensors it keeps for backward (chunk states included) are bf16/fp16, with fp32 inputs they are fp32 and
    the products tf32 tensor-core dots on CUDA (about 1e-3 relative error against fp32).
    """
    if cu_seqlens is not None and (not isinstance(cu_seqlens, torch.Tensor)
                                   or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"{_OP}: cu_seqlens must be an int32/int64 tensor [N+1], got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
    host = host_cu_seqlens(cu_seqlens, cu_seqlens_cpu, _OP)
    _validate(q, k, v, g, beta, initial_state, host)
    if not isinstance(output_final_state, bool):
        raise ValueError(f"{_OP}: output_final_state must be a bool, got {output_final_state!r}")
    key_dim = q.shape[-1]
    if scale is None:
        scale = key_dim ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"{_OP}: scale must be a float or None, got {scale!r}")
    scale = float(scale)
    chosen = resolve_backend(backend, q, k, v, g, beta, op=_OP)
    if chosen == "triton":
        from lctrain.kernels.gated_delta_rule.triton_config import TORCH_DTYPES, launch_config

        if q.dtype not in TORCH_DTYPES:
            raise ValueError(f"{_OP}: backend='triton' needs q/k/v in one of "
                             f"{sorted(str(d) for d in TORCH_DTYPES)}, got {q.dtype}")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise ValueError(f"{_OP}: backend='triton' needs q, k, v of one dtype, got "
                             f"q={q.dtype}, k={k.dtype}, v={v.dtype}")
        launch_config(key_dim, v.shape[-1], TORCH_DTYPES[q.dtype])  # raises ValueError for unsupported dims
    o, final_state = _gdn_op(q, k, v, g, beta, initial_state, device_cu_seqlens(cu_seqlens, host, q.device), host,
                             scale, output_final_state, chosen)
    return o, (none_if_empty(final_state) if output_final_state else None)


def _run(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu, scale, output_final_state, backend):
    if backend == "triton":
        from lctrain.kernels.gated_delta_rule.triton_chunk import triton_gated_delta_rule

        o, final_state = triton_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                 cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)
    else:
        impl = naive_gated_delta_rule if backend == "naive" else chunk_gated_delta_rule
        o, final_state = impl(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
        if final_state is not None and final_state.dtype != torch.float64:
            final_state = final_state.to(torch.float32)
    return o.to(q.dtype), final_state


def _fake(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu, scale, output_final_state, backend):
    return recurrent_fake(q, v, cu_seqlens_cpu, output_final_state, backend, q.shape[-1], v.shape[-1])


_gdn_op = opaque_op(
    _OP, "Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor? initial_state, Tensor? cu_seqlens, "
    "Tensor? cu_seqlens_cpu, float scale, bool output_final_state, str backend",
    differentiable=("q", "k", "v", "g", "beta", "initial_state"), num_outputs=2, run=_run, fake=_fake)
