"""`sf_attention`: grouped attention for long-context fine-tuning, SinkLoRA's SF-Attn and LongLoRA's S²-Attn.

Both methods cut every row into groups of G tokens and let a query attend causally only inside its group, so
attention costs O(T * G) instead of O(T^2). Half of the heads use groups counted from the row start, the other
half groups shifted by G/2, so information crosses every group boundary through one of the two halves.

* "s2" (LongLoRA, as published) shifts by rolling each row left by G/2 and rolling the outputs back. The roll
  wraps around: the last rolled group holds the end of the row followed by its first G/2 tokens, and since
  attention is causal in rolled order those first tokens attend to the end of the row, i.e. to the future.
  This leak is kept on purpose so the baseline is faithful.
* "sf" (SinkLoRA's SF-Attn) shifts the group boundaries without wrapping (the first shifted group is
  [0, G/2)), so attention is strictly causal, and makes the first `sink` tokens of each document visible to
  every later query: with short groups the softmax otherwise has no stable place to put surplus attention
  mass, the role the initial tokens play in full attention ("attention sinks"). The shifted heads' outputs are
  returned to the original token order ("segmentation and reassembly") before the caller's output
  projection, so every head of a token describes that same token.

Implementation: `segments.py` packs each head half's tokens into segments (sink prefix + one (row, group,
document) run) and the varlen `local_attention` kernel runs full causal attention inside each segment
(`window = longest segment`), so memory is O(T * (G + sink)) and the Triton, blocked PyTorch and naive
backends of `local_attention` all apply. `naive.py` holds the dense float64 reference.
"""
from __future__ import annotations

import torch

from lctrain.kernels.local_attention import local_attention
from lctrain.kernels.sf_attention.naive import kv_head_index, naive_sf_attention
from lctrain.kernels.sf_attention.segments import SegmentPlan, reassemble, segment, segment_plan
from lctrain.kernels.opaque import opaque_op
from lctrain.kernels.utils import check_attention_qkv, compiling, device_cu_seqlens, host_cu_seqlens, resolve_backend

__all__ = ["sf_attention", "naive_sf_attention", "SegmentPlan", "segment_plan", "segment", "reassemble",
           "kv_head_index"]

_OP = "sf_attention"
VARIANTS = ("sf", "s2")


def sf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    sink: int = 4,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    variant: str = "sf",
    backend: str | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped causal attention with half the heads shifted by G/2 (SF-Attn or S²-Attn).

    Heads `[0, H/2)` group row position t as `t // G`; heads `[H/2, H)` are shifted by G/2.
    "sf": query i attends key j iff same row and document, j <= i, and (same group for its head half, or j is
    among the first `sink` tokens of the document). "s2": the shifted heads use LongLoRA's roll (rolled
    position r holds token (r + G/2) mod T, groups r // G, causal in rolled order, same document), which
    lets the first G/2 tokens of a row see its last tokens; no sink.

    Args:
        q: queries `[B, T, H, D]`, H even.
        k: keys `[B, T, Hkv, D]`; Hkv divides H and head h reads kv head h // (H / Hkv) (GQA).
        v: values `[B, T, Hkv, Dv]`.
        group_size: G, an even int >= 2.
        sink: sink tokens per document (int >= 0); must be 0 for "s2".
        scale: multiplies q.k before the softmax; defaults to `D ** -0.5`.
        cu_seqlens: int32/int64 `[N+1]` document offsets over the flattened `B * T` tokens (every row start
            must be one of them), or None (each row is one document).
        variant: "sf" (SinkLoRA) or "s2" (LongLoRA).
        backend: `local_attention` backend: None (Triton on CUDA, blocked PyTorch otherwise), "triton",
            "torch" or "naive".
        cu_seqlens_cpu: the same offsets as an int32 CPU tensor (the batch's host copy); the segment plan is
            built from it on the host. Omitted with `cu_seqlens` given: one copy is made here (a device sync).

    Runs as the custom op `lctrain::sf_attention` (opaque to torch.compile).

    Returns:
        o `[B, T, H, Dv]` in q's dtype. Gradients flow to q, k and v.
    """
    if cu_seqlens is not None:
        _validate_cu_seqlens_dtype(cu_seqlens)
    host = host_cu_seqlens(cu_seqlens, cu_seqlens_cpu, _OP)
    _validate(q, k, v, group_size, sink, scale, host, variant)
    resolve_backend(backend, q, k, v, op=_OP)
    return _sf_op(q, k, v, device_cu_seqlens(cu_seqlens, host, q.device), host, group_size, sink,
                  None if scale is None else float(scale), variant, backend or "auto")[0]


def _plan_on(plan: SegmentPlan, device) -> tuple[SegmentPlan, torch.Tensor]:
    """A host-built plan moved to `device`, and its segment offsets kept on the host for the kernel."""
    moved = SegmentPlan(*(t.to(device, non_blocking=True) for t in (plan.gather_index, plan.cu_seqlens,
                                                                   plan.query_rows)), plan.max_segment)
    return moved, plan.cu_seqlens


def _run(q, k, v, cu_seqlens, cu_seqlens_cpu, group_size, sink, scale, variant, backend):
    backend = None if backend == "auto" else backend
    batch, length, heads, head_dim = q.shape
    kv_heads, value_dim = k.shape[2], v.shape[-1]
    if batch * length == 0:
        return (q.new_zeros(batch, length, heads, value_dim),)
    half_q = heads // 2
    if kv_heads % 2 and kv_heads > 1:  # odd GQA groups straddle the halves: give every query head its kv head
        k, v = (x.repeat_interleave(heads // kv_heads, dim=2) for x in (k, v))
        kv_heads = heads
    half_kv = kv_heads // 2 if kv_heads % 2 == 0 else kv_heads
    q_flat = q.reshape(batch * length, heads, head_dim)
    k_flat = k.reshape(batch * length, kv_heads, head_dim)
    v_flat = v.reshape(batch * length, kv_heads, value_dim)
    plain_sink = sink if variant == "sf" else 0
    outputs = []
    for part, shifted in enumerate((False, True)):
        # Built on the host from the host offsets (no device reads), then moved once.
        plan, plan_cpu_offsets = _plan_on(segment_plan(batch, length, group_size, cu_seqlens_cpu, shifted=shifted,
                                                       sink=plain_sink, wrap=shifted and variant == "s2",
                                                       device="cpu"), q.device)
        q_half = q_flat[:, part * half_q:(part + 1) * half_q]
        kv_slice = slice(part * half_kv, (part + 1) * half_kv) if kv_heads % 2 == 0 else slice(None)
        q_p, k_p, v_p = (segment(x, plan)[None] for x in (q_half, k_flat[:, kv_slice], v_flat[:, kv_slice]))
        o_p = local_attention(q_p, k_p, v_p, window=plan.max_segment, sink=0, scale=scale,
                              cu_seqlens=plan.cu_seqlens, cu_seqlens_cpu=plan_cpu_offsets, backend=backend)
        outputs.append(reassemble(o_p[0], plan))
    return (torch.cat(outputs, dim=1).view(batch, length, heads, value_dim),)


def _fake(q, k, v, cu_seqlens, cu_seqlens_cpu, group_size, sink, scale, variant, backend):
    return (q.new_empty(*q.shape[:3], v.shape[-1]),)


_sf_op = opaque_op(
    _OP, "Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, Tensor? cu_seqlens_cpu, int group_size, int sink, "
    "float? scale, str variant, str backend", differentiable=("q", "k", "v"), num_outputs=1, run=_run, fake=_fake)


def _validate(q, k, v, group_size, sink, scale, cu_seqlens, variant) -> None:
    """Raise a one-line ValueError naming the bad argument, its value and what is allowed."""
    check_attention_qkv(q, k, v, _OP)
    batch, length, heads, _ = q.shape
    if heads % 2:
        raise ValueError(f"{_OP}: H={heads} query heads must be even (half the heads are shifted)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"{_OP}: group_size={group_size!r} must be an even int >= 2 (shifted heads move by "
                         f"group_size / 2)")
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"{_OP}: sink={sink!r} must be an int >= 0")
    if variant not in VARIANTS:
        raise ValueError(f"{_OP}: variant={variant!r} is not one of {VARIANTS}")
    if variant == "s2" and sink:
        raise ValueError(f"{_OP}: variant='s2' (LongLoRA S²-Attn) has no sink tokens, got sink={sink}; pass "
                         f"sink=0")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"{_OP}: scale must be a Python number or None, got {type(scale).__name__}")
    if cu_seqlens is not None:
        _validate_cu_seqlens(cu_seqlens, batch, length)


def _validate_cu_seqlens_dtype(cu_seqlens) -> None:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        kind = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"{_OP}: cu_seqlens must be an int32 or int64 tensor [N+1], got {kind}")


def _validate_cu_seqlens(cu_seqlens, batch: int, length: int) -> None:
    """cu_seqlens: the host offsets. Values are checked in eager mode only (see `kernels.utils.compiling`)."""
    _validate_cu_seqlens_dtype(cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{_OP}: cu_seqlens must be 1-D [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if compiling():
        return
    total = batch * length
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"{_OP}: cu_seqlens must start at 0 and end at B*T={total}, got {offsets}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{_OP}: cu_seqlens must be non-decreasing, got {offsets}")
    missing = sorted(set(range(0, total, length)) - set(offsets)) if length else []
    if missing:
        raise ValueError(f"{_OP}: cu_seqlens must contain every row start b*T (T={length}), missing {missing}")
