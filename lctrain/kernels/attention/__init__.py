"""`attention`: the fused softmax-attention op (causal, packed documents, GQA, sliding window + sinks, log-sum-exp,
block form), with its float64 reference.

Implementations: `naive.py` (dense float64 mask, the ground truth), `blockwise.py` (PyTorch, online softmax over
key pieces, memory linear in T: the CPU path), the Triton kernels (`triton_fwd.py`, `triton_bwd.py`, launched by
`triton_attention.py`: the CUDA path) and flash-attn when installed (`flash.py`). The torch and Triton paths run
as the `lctrain::attention_fwd` / `_bwd` custom ops (`op.py`).

The block form (`q_offset`, `k_offset`) computes queries of one chunk of a row against keys of another chunk with
the row's global causal / document / window rule and returns `(o, lse)`; results over disjoint key chunks merge
exactly with `merge_partials`. Backward of a merged result: `attention_backward` with the merged `(o, lse)` gives
each block's exact share of the gradients. This is how every sequence-parallel mode uses the op.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from lctrain.kernels.attention.blockwise import compute_dtype
from lctrain.kernels.attention.naive import naive_attention
from lctrain.kernels.attention.pattern import Pattern
from lctrain.kernels.utils import check_qkv_tensors, triton_interpreting

__all__ = ["attention", "attention_forward", "attention_backward", "merge_partials", "naive_attention",
           "local_attention_op",
           "resolve_attention_backend", "BACKENDS"]

_OP = "attention"
BACKENDS = ("triton", "torch", "naive", "flash")


def resolve_attention_backend(backend: str | None, q: torch.Tensor, flash_fits: bool = False) -> str:
    """None (auto): flash-attn if installed and the call fits it, else Triton on CUDA, else torch."""
    if backend is None or backend == "auto":
        if flash_fits:
            return "flash"
        return "triton" if q.is_cuda else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{_OP}: backend={backend!r} is not one of {BACKENDS} or None")
    if backend == "triton" and not q.is_cuda and not triton_interpreting():
        raise ValueError(f"{_OP}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing "
                         "triton")
    if backend == "flash" and not flash_fits:
        raise ValueError(f"{_OP}: backend='flash' needs flash-attn installed, CUDA fp16/bf16 tensors and the plain "
                         "causal form (no block offsets, no sinks, one window for all heads)")
    return backend


def _spans(name: str, span, heads: int, minimum: int) -> tuple[int, ...]:
    """int, sequence or integer tensor `[H]` -> per-head tuple (a tensor is read on the host: pass CPU ones)."""
    if isinstance(span, torch.Tensor):
        if span.dtype.is_floating_point or span.dim() != 1:
            raise ValueError(f"{_OP}: {name} tensor must be integer [H], got {span.dtype} {list(span.shape)}")
        span = span.tolist()
    if isinstance(span, bool) or not isinstance(span, (int, Sequence)):
        raise ValueError(f"{_OP}: {name} must be an int or per-head ints [H], got {type(span).__name__}")
    values = [span] * heads if isinstance(span, int) else list(span)
    if len(values) != heads or any(isinstance(x, bool) or not isinstance(x, int) or x < minimum for x in values):
        raise ValueError(f"{_OP}: {name} must be an int >= {minimum} or {heads} per-head ints >= {minimum}, "
                         f"got {span!r}")
    return tuple(values)


def _prepare(q, k, v, causal, cu_seqlens, cu_seqlens_cpu, window, sink, scale, q_offset, k_offset):
    """Validate; return (pattern, device offsets or None, host offsets or None). Raises one-line ValueErrors."""
    check_qkv_tensors(_OP, q, k, v)
    batch, tq, heads, dim = q.shape
    tk, kv_heads = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[-1] != dim or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{_OP}: k shape {tuple(k.shape)} must be [B, Tk, Hkv, D] = [{batch}, Tk, Hkv, {dim}] "
                         f"with Hkv dividing H={heads}")
    if v.shape[:3] != k.shape[:3] or v.shape[-1] == 0 or dim == 0:
        raise ValueError(f"{_OP}: v shape {tuple(v.shape)} must be [B, Tk, Hkv, Dv] = [{batch}, {tk}, {kv_heads}, "
                         f"Dv] and head dims >= 1")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{_OP}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, value in (("q_offset", q_offset), ("k_offset", k_offset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{_OP}: {name} must be an int >= 0, got {value!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"{_OP}: scale must be a Python number or None, got {type(scale).__name__}")
    windows = () if window is None else _spans("window", window, heads, 1)
    sinks = _spans("sink", sink, heads, 0)
    if not windows and any(sinks):
        raise ValueError(f"{_OP}: sink={sink!r} needs a window (without one every key is visible anyway)")
    if windows and not causal:
        raise ValueError(f"{_OP}: a window needs causal=True")
    if cu_seqlens is not None or cu_seqlens_cpu is not None:
        if batch != 1:
            raise ValueError(f"{_OP}: cu_seqlens needs batch size 1 (packed layout), got B={batch}")
        for name, value in (("cu_seqlens", cu_seqlens), ("cu_seqlens_cpu", cu_seqlens_cpu)):
            if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 1
                                      or value.dtype not in (torch.int32, torch.int64) or value.numel() < 2):
                raise ValueError(f"{_OP}: {name} must be an int32/int64 tensor [N+1], got "
                                 f"{getattr(value, 'dtype', type(value).__name__)} "
                                 f"{list(getattr(value, 'shape', []))}")
        if cu_seqlens_cpu is None:
            cu_seqlens_cpu = cu_seqlens.detach().cpu()       # a device-to-host copy: pass cu_seqlens_cpu to avoid it
        elif cu_seqlens_cpu.device.type != "cpu":
            raise ValueError(f"{_OP}: cu_seqlens_cpu must be a CPU tensor, got one on {cu_seqlens_cpu.device}")
        cu_seqlens_cpu = cu_seqlens_cpu.to(torch.int32)
        if cu_seqlens is None:
            cu_seqlens = cu_seqlens_cpu.to(q.device)
    if cu_seqlens_cpu is not None and not torch.compiler.is_compiling():
        # Values are checked eagerly only: a compiled graph must not read the offsets (the op reads them itself).
        offsets = cu_seqlens_cpu.tolist()
        end = max(q_offset + tq, k_offset + tk)
        if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])) or offsets[-1] < end:
            raise ValueError(f"{_OP}: cu_seqlens must start at 0, be non-decreasing and end at or after the last "
                             f"query / key index {end}, got {offsets}")
    scale = dim ** -0.5 if scale is None else float(scale)
    offsets = None if cu_seqlens_cpu is None or torch.compiler.is_compiling() else tuple(offsets)
    pattern = Pattern(bool(causal), windows, sinks if windows else (), scale, q_offset, k_offset, offsets)
    return pattern, cu_seqlens, cu_seqlens_cpu


def _flash_fits(q, k, pattern: Pattern) -> bool:
    from lctrain.kernels.attention.flash import flash_supports
    return flash_supports(q, pattern.windows, pattern.sinks, pattern.q_offset, pattern.k_offset, k.shape[1],
                          pattern.causal)


def _op_args(pattern: Pattern, cu_seqlens, cu_seqlens_cpu, backend: str):
    return (cu_seqlens, cu_seqlens_cpu, pattern.causal, list(pattern.windows), list(pattern.sinks), pattern.scale,
            pattern.q_offset, pattern.k_offset, backend)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              cu_seqlens: torch.Tensor | None = None, cu_seqlens_cpu: torch.Tensor | None = None,
              window: int | Sequence[int] | torch.Tensor | None = None, sink: int | Sequence[int] | torch.Tensor = 0,
              scale: float | None = None, return_lse: bool = False, q_offset: int = 0, k_offset: int = 0,
              backend: str | None = None):
    """Softmax attention within documents, optionally windowed with sinks, and its block form.

    Query i (global index `q_offset + i`) attends key j (global index `k_offset + j`) iff both lie in the same
    document, j <= i (with `causal`), and, with a window, i - j < W_h or j - doc_start < S_h (head h).

    Args:
        q: `[B, Tq, H, D]`.  k: `[B, Tk, Hkv, D]`, Hkv divides H, query head h reads kv head h // (H / Hkv).
        v: `[B, Tk, Hkv, Dv]`.
        causal: mask keys after the query (False: whole documents; no window then).
        cu_seqlens: int32/int64 `[N+1]` document offsets of the row (B == 1), on q's device. In the plain form
            they end at T; in the block form they cover the whole row (global indices, ending at or after
            the last query and key).
        cu_seqlens_cpu: the same offsets as a CPU tensor: every shape and skip decision reads these. Given
            `cu_seqlens` alone, the op copies it to the host once (a device sync).
        window: None (no window), an int >= 1 or per-head ints `[H]` (keys within `window` tokens, itself included).
        sink: int or per-head ints: the first `sink` tokens of each document stay visible (needs a window).
        scale: defaults to `D ** -0.5`.
        return_lse: also return the per-query log-sum-exp `[B, H, Tq]` (float32; float64 for float64 inputs;
            -inf, with o = 0, for a query that sees no key). Differentiable.
        q_offset, k_offset: global index of the first query / key (block form).
        backend: None (flash-attn if installed and the call fits it, else Triton on CUDA, else torch), "triton",
            "torch", "flash" or "naive" (the float64 reference). "torch" runs torch's fused SDPA (causal, no
            mask) for the plain causal form without window or log-sum-exp when every row is one document or the
            row holds at most `SDPA_MAX_DOCS` documents (one call per document), and the blockwise path otherwise.

    Returns:
        o `[B, Tq, H, Dv]` in q's dtype, or `(o, lse)` with `return_lse`.
    """
    pattern, cu_seqlens, cu_seqlens_cpu = _prepare(q, k, v, causal, cu_seqlens, cu_seqlens_cpu, window, sink, scale,
                                                   q_offset, k_offset)
    chosen = resolve_attention_backend(backend, q, backend in (None, "auto", "flash") and _flash_fits(q, k, pattern))
    if chosen == "naive":
        o, lse = naive_attention(q, k, v, pattern, cu_seqlens)
        o, lse = o.to(q.dtype), lse.to(compute_dtype(q.dtype))
    elif chosen == "flash":
        from lctrain.kernels.attention.flash import flash_attention
        batch, length = q.shape[:2]
        flat = [t.reshape(1, batch * length, *t.shape[2:]) for t in (q, k, v)]
        if cu_seqlens is None:
            cu_seqlens = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * length
            max_len = length
        else:
            offsets = pattern.offsets
            max_len = max(b - a for a, b in zip(offsets, offsets[1:]))
        o, lse = flash_attention(*flat, pattern.scale, cu_seqlens.to(torch.int32), max_len, pattern.widest,
                                 return_lse)
        o = o.view(batch, length, *o.shape[2:])
        if lse is not None:
            lse = lse.reshape(q.shape[2], batch, length).transpose(0, 1) if batch > 1 else lse
    elif chosen == "torch" and not return_lse and _sdpa_fits(q, k, pattern, cu_seqlens):
        o = _sdpa_per_document(q, k, v, pattern)
    else:
        if chosen == "triton":
            _check_triton(q, v)
        from lctrain.kernels.attention.op import attention_fwd
        o, lse = attention_fwd(q, k, v, *_op_args(pattern, cu_seqlens, cu_seqlens_cpu, chosen))
    return (o, lse) if return_lse else o


SDPA_MAX_DOCS = 16  # beyond this, one Python call per document costs more than the blockwise path


def _sdpa_fits(q, k, pattern: Pattern, cu_seqlens) -> bool:
    """torch's fused SDPA (causal, no mask: a flash-style kernel, linear memory) serves the plain causal form
    without a window when every row is one document, or per document for a few packed ones (host lengths)."""
    if not pattern.causal or pattern.windows or pattern.q_offset or pattern.k_offset or q.shape[1] != k.shape[1] \
            or q.shape[-1] != k.shape[-1] or torch.compiler.is_compiling():
        return False
    return cu_seqlens is None or (pattern.offsets is not None and len(pattern.offsets) - 1 <= SDPA_MAX_DOCS)


def _sdpa_per_document(q, k, v, pattern: Pattern) -> torch.Tensor:
    import torch.nn.functional as F
    gqa = q.shape[2] != k.shape[2]

    def one(a, b):
        return F.scaled_dot_product_attention(q[:, a:b].transpose(1, 2), k[:, a:b].transpose(1, 2),
                                              v[:, a:b].transpose(1, 2), is_causal=True, scale=pattern.scale,
                                              enable_gqa=gqa).transpose(1, 2)
    if pattern.offsets is None:
        return one(0, q.shape[1])
    bounds = [(a, b) for a, b in zip(pattern.offsets, pattern.offsets[1:]) if b > a]
    return torch.cat([one(a, b) for a, b in bounds], dim=1)


def _check_triton(q: torch.Tensor, v: torch.Tensor) -> None:
    from lctrain.kernels.attention.triton_config import MAX_HEAD_DIM
    if q.dtype == torch.float64:
        raise ValueError(f"{_OP}: backend='triton' does not support float64; use backend='torch' or 'naive'")
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: backend='triton' supports head dims D, Dv <= {MAX_HEAD_DIM}, got "
                         f"D={q.shape[-1]}, Dv={v.shape[-1]}")


def _kernel_backend(backend: str | None, q: torch.Tensor, v: torch.Tensor) -> str:
    chosen = resolve_attention_backend(None if backend in (None, "auto", "flash") else backend, q)
    if chosen == "naive":
        chosen = "torch"
    if chosen == "triton":
        _check_triton(q, v)
    return chosen


def attention_forward(q, k, v, *, causal=True, cu_seqlens=None, cu_seqlens_cpu=None, window=None, sink=0,
                      scale=None, q_offset=0, k_offset=0, backend=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block, no autograd: `(o, lse)` as `attention(..., return_lse=True)` (Triton on CUDA, else torch).
    For callers that own the backward (sequence parallelism): pair it with `attention_backward`."""
    pattern, cu_seqlens, cu_seqlens_cpu = _prepare(q, k, v, causal, cu_seqlens, cu_seqlens_cpu, window, sink, scale,
                                                   q_offset, k_offset)
    from lctrain.kernels.attention.op import attention_fwd
    with torch.no_grad():
        return attention_fwd(q, k, v, *_op_args(pattern, cu_seqlens, cu_seqlens_cpu,
                                                _kernel_backend(backend, q, v)))


def attention_backward(q, k, v, o, lse, grad_o, *, causal=True, cu_seqlens=None, cu_seqlens_cpu=None, window=None,
                       sink=0, scale=None, q_offset=0, k_offset=0, backend=None):
    """This block's share `(dq, dk, dv)` (compute dtype) of the gradient of a result whose output and
    log-sum-exp are `o`, `lse` (merged over every block the queries saw) for output gradient `grad_o`."""
    pattern, cu_seqlens, cu_seqlens_cpu = _prepare(q, k, v, causal, cu_seqlens, cu_seqlens_cpu, window, sink, scale,
                                                   q_offset, k_offset)
    from lctrain.kernels.attention.op import attention_bwd
    return attention_bwd(q, k, v, o, lse, grad_o, None, *_op_args(pattern, cu_seqlens, cu_seqlens_cpu,
                                                                  _kernel_backend(backend, q, v)))


def merge_partials(o_acc: torch.Tensor | None, lse_acc: torch.Tensor | None, o_blk: torch.Tensor,
                   lse_blk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial results over disjoint key sets: o `[B, Tq, H, Dv]`, lse `[B, H, Tq]`. The merged output
    is in lse's dtype (float32 accumulation for bf16 blocks); None accumulators start the merge."""
    o_blk = o_blk.to(lse_blk.dtype)
    if o_acc is None:
        return o_blk, lse_blk
    lse = torch.logaddexp(lse_acc, lse_blk)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_acc = torch.exp(lse_acc - safe).transpose(1, 2)[..., None]
    w_blk = torch.exp(lse_blk - safe).transpose(1, 2)[..., None]
    return o_acc * w_acc + o_blk * w_blk, lse


def local_attention_op(backend: str | None = None):
    """`attention` in `lctrain.kernels.local_attention`'s calling convention `op(q, k, v, window, sink, scale,
    cu_seqlens=..., backend=...)` (plus `cu_seqlens_cpu`): what `sp_local_attention` calls per packed stream."""
    def op(q, k, v, window, sink, scale, cu_seqlens=None, cu_seqlens_cpu=None, backend=backend):
        return attention(q, k, v, window=window, sink=sink, scale=scale, cu_seqlens=cu_seqlens,
                         cu_seqlens_cpu=cu_seqlens_cpu, backend=backend)
    return op
