"""The one entry point of the softmax-attention family: q, k, v, a pattern and the batch context in, output out.

Pattern (what each query sees; `AttentionPattern`): full causal attention within documents; a sliding window with
sinks (`swa`, MoA's per-head elastic spans); or SF-/S²-Attn groups (context-extension training). Placement (where
the tokens are; from the context): decoding with a cache, MoA probing (dense, for profiling only), sequence
parallel over an SP group, or one device. Every path except probing and SF groups runs the fused op
`lctrain.kernels.attention` (or its block form under SP), so no `[T, T]` tensor exists, and every shape decision
reads host values (`ctx.docs`, the SP placement).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lctrain.config import ConfigError
from lctrain.kernels.attention import attention
from lctrain.models.context import BatchContext

Spans = Callable[[int], tuple]  # row length -> (window: int or per-head tuple, sink: int)


@dataclass(frozen=True)
class AttentionPattern:
    """scale; spans: None (full) or `length -> (window, sink)`; groups: `(group_size, variant, sink)` for
    SF-/S²-Attn (None otherwise); layer: cache key; kv_budget: H2O `(budget, recent)` while decoding."""
    scale: float
    spans: Spans | None = None
    groups: tuple[int, str, int] | None = None
    layer: int = 0
    kv_budget: tuple[int, int] | None = None
    probed: bool = True


def kernel_backend(name: str | None) -> str | None:
    """`model.attn_backend` / a mixer's backend option -> the op's backend argument (auto -> None)."""
    return None if name in (None, "auto") else name


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern, ctx: BatchContext,
           backend: str | None = None) -> torch.Tensor:
    """q `[B, T, H, D]`, k `[B, T, Hkv, D]`, v `[B, T, Hkv, Dv]` (this rank's tokens under SP) -> `[B, T, H, Dv]`."""
    if ctx.cache is not None:
        from lctrain.models.kv_cache import attend_cached
        return attend_cached(q, k, v, ctx.cache.setdefault(pattern.layer, {}), pattern.scale, pattern.spans,
                             pattern.kv_budget, backend)
    probe = ctx.extras.get("attn_probe")
    if probe is not None and pattern.probed:
        from lctrain.models.probe import probed_attention
        return probed_attention(q, k, v, ctx.position_ids, pattern.scale, lambda a: probe(pattern.layer, a))
    if pattern.groups is not None:
        return _grouped(q, k, v, pattern, ctx)
    if ctx.sp is not None:
        return _sequence_parallel(q, k, v, pattern, ctx, backend)
    window, sink = pattern.spans(q.shape[1]) if pattern.spans is not None else (None, 0)
    docs = ctx.docs
    if docs is None and ctx.cu_seqlens is None:
        from lctrain.models.documents import Documents  # a context without host boundaries (eval): one copy
        docs = Documents.from_positions(ctx.position_ids)
    if docs is not None and docs.single_doc_rows:
        return attention(q, k, v, window=window, sink=sink, scale=pattern.scale, backend=backend)
    batch, seqlen = q.shape[:2]
    flat = [t.reshape(1, batch * seqlen, *t.shape[2:]) for t in (q, k, v)]
    cu_cpu = docs.cu_seqlens_cpu if docs is not None else None
    cu = ctx.cu_seqlens if ctx.cu_seqlens is not None else cu_cpu.to(q.device)
    o = attention(*flat, window=window, sink=sink, scale=pattern.scale, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu,
                  backend=backend)
    return o.view(batch, seqlen, *o.shape[2:])


def _grouped(q, k, v, pattern: AttentionPattern, ctx: BatchContext) -> torch.Tensor:
    """SF-Attn / S²-Attn over groups of `group_size` tokens (a quarter of the sequence when 0)."""
    if ctx.sp is not None:
        raise ConfigError("model.mixers.attn: the sf_attn/s2_attn modes do not run under sequence parallelism "
                          "(parallel.sp > 1) yet; use sp=1")
    from lctrain.kernels.sf_attention import sf_attention
    group_size, variant, sink = pattern.groups
    group = group_size or max(2, q.shape[1] // 8 * 2)
    return sf_attention(q, k, v, group, sink=sink if variant == "sf" else 0, scale=pattern.scale,
                        cu_seqlens=ctx.cu_seqlens, variant=variant)


def _sequence_parallel(q, k, v, pattern: AttentionPattern, ctx: BatchContext, backend) -> torch.Tensor:
    placement = ctx.sp
    if pattern.spans is None:
        from lctrain.parallel import sp_attention
        return sp_attention(q, k, v, placement, scale=pattern.scale, backend=backend)
    from lctrain.parallel import sp_local_attention  # halo of window - 1 keys plus the sink keys
    window, sink = pattern.spans(placement.orig_len)  # spans of the whole (unpadded) row
    return sp_local_attention(q, k, v, window, sink, pattern.scale, placement, backend=backend)
