"""Plumbing shared by the linear-family mixers: how a recurrent op is run for a batch.

Three situations, one entry point:
- training on one device: rows are flattened to one packed stream and the op gets `cu_seqlens`, so every document
  starts from a zero state; when every row is one document (host metadata `ctx.docs.single_doc_rows`) the op runs
  on the `[B, T]` batch directly;
- sequence parallel: `lctrain.parallel` supplies the state entering this rank's shard (LASP-2);
- decoding: the state (and short-convolution inputs) are carried in the per-layer cache.
"""
from __future__ import annotations

import torch

from lctrain import kernels
from lctrain.kernels.opaque import kernel_recompute
from lctrain.models.context import BatchContext


def _flatten(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.dim() < 2:
        return t
    return t.reshape(1, t.shape[0] * t.shape[1], *t.shape[2:])


def op_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype q/k/v should reach a kernel op in: the autocast dtype while autocast is on (the fp32 residual
    stream and fp32 short-convolution weights would otherwise promote them and select the fp32 kernel variant:
    twice the bytes, tf32 dots), else x's own. Ops keep states and accumulation in fp32 either way."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def run_linear_op(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: BatchContext,
                  layer_cache: dict | None, backend: str | None = None, recompute: bool = True,
                  **gates) -> torch.Tensor:
    """Run `lctrain.kernels.<name>(q, k, v, **gates, ...)` for q/k [B, T, H, K], v [B, T, H, V]; gates are
    [B, T, H] (per token) or [H] (per head); recompute: `model.kernel_recompute`. Returns o [B, T, H, V]."""
    if not recompute and not torch.compiler.is_compiling():
        with kernel_recompute(False):
            return run_linear_op(name, q, k, v, ctx, layer_cache, backend, True, **gates)
    op = getattr(kernels, name)
    batch, seqlen = q.shape[:2]
    if layer_cache is not None:
        o, state = op(q, k, v, **gates, initial_state=layer_cache.get("state"), output_final_state=True,
                      backend=backend)
        layer_cache["state"] = state.detach()
        return o
    if ctx.sp is not None:
        from lctrain import parallel
        return getattr(parallel, f"sp_{name}")(q, k, v, **gates, placement=ctx.sp, backend=backend)
    docs = ctx.docs
    if ctx.cu_seqlens is None or (docs is not None and docs.single_doc_rows):  # host value: no device read
        o, _ = op(q, k, v, **gates, backend=backend)
        return o
    flat_gates = {key: _flatten(val) if val is not None and val.dim() == 3 else val for key, val in gates.items()}
    o, _ = op(_flatten(q), _flatten(k), _flatten(v), **flat_gates, cu_seqlens=ctx.cu_seqlens,
              cu_seqlens_cpu=None if docs is None else docs.cu_seqlens_cpu, backend=backend)
    return o.reshape(batch, seqlen, *o.shape[2:])


def short_conv(conv, x: torch.Tensor, ctx: BatchContext, layer_cache: dict | None, key: str) -> torch.Tensor:
    """Document-aware causal short convolution of x [B, T, C]; under sequence parallelism the previous k-1
    inputs come from the neighbouring shard."""
    if layer_cache is not None:
        return conv(x, None, cache=layer_cache, key=key)
    if ctx.sp is not None:
        from lctrain import parallel
        return parallel.sp_short_conv(conv, x, ctx.sp)
    if ctx.docs is not None and ctx.docs.single_doc_rows:
        return conv(x, None)  # one document per row: nothing to mask
    return conv(x, ctx.position_ids, document_ids=ctx.document_ids)
