"""Launchers of the `attention` Triton kernels (called by the `lctrain::attention_fwd` / `_bwd` custom ops) and
their ahead-of-time compile list. Launch sizes come from `triton_config.launch_config` alone."""
from __future__ import annotations

import torch
import triton

from lctrain.kernels.attention.pattern import Pattern, document_bounds
from lctrain.kernels.attention.triton_bwd import attention_bwd_dkv_kernel, attention_bwd_dq_kernel
from lctrain.kernels.attention.triton_config import SUPPORTED_HEAD_DIMS, config_dtype, launch_config
from lctrain.kernels.attention.triton_fwd import attention_fwd_kernel


def _nan(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # kernels must write every element they own; NaN makes a missed one visible
    return torch.full(shape, float("nan"), dtype=dtype, device=like.device)


def _tables(q: torch.Tensor, k: torch.Tensor, pattern: Pattern, cu_seqlens):
    """Device int32 tables: query / key document starts, key document ends, per-head window and sink. Spans
    beyond the last query change nothing and are clamped so every bound stays inside int32."""
    tq, tk, heads = q.shape[1], k.shape[1], q.shape[2]
    reach = pattern.q_offset + tq + 1
    q_start, _ = document_bounds(cu_seqlens, pattern.q_offset, tq, q.device)
    k_start, k_end = document_bounds(cu_seqlens, pattern.k_offset, tk, q.device)
    windows = pattern.windows or (reach,) * heads
    sinks = pattern.sinks or (0,) * heads
    spans = torch.tensor([[min(w, reach) for w in windows], [min(s, reach) for s in sinks]], dtype=torch.int32)
    spans = spans.to(q.device, non_blocking=True)
    return (q_start.to(torch.int32), k_start.to(torch.int32), k_end.clamp(max=reach).to(torch.int32),
            spans[0], spans[1])


def _dims(q, k, v, pattern: Pattern):
    return (pattern.scale, q.shape[1], k.shape[1], pattern.q_offset, pattern.k_offset, q.shape[2], k.shape[2],
            q.shape[3], v.shape[3])


def triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                   cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not pattern.causal:
        raise ValueError("attention: backend='triton' computes causal attention only; use backend='torch'")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, tq, heads, head_dim = q.shape
    value_dim = v.shape[-1]
    o = _nan((batch, tq, heads, value_dim), q, q.dtype)
    lse = _nan((batch, heads, tq), q, torch.float32)
    if tq == 0 or k.shape[1] == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    q_start, k_start, _, windows, sinks = _tables(q, k, pattern, cu_seqlens)
    cfg = launch_config(head_dim, value_dim, "fwd", config_dtype(q.dtype))
    attention_fwd_kernel[(triton.cdiv(tq, cfg.block_m), batch * heads)](
        q, k, v, o, lse, q_start, k_start, windows, sinks, *_dims(q, k, v, pattern),
        BM=cfg.block_m, BN=cfg.block_n, BD=cfg.block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o, lse


def triton_backward(q, k, v, o, lse, grad_o, grad_lse, pattern: Pattern, cu_seqlens):
    """(dq, dk, dv) in float32."""
    q, k, v, grad_o = q.contiguous(), k.contiguous(), v.contiguous(), grad_o.contiguous()
    batch, tq, heads, head_dim = q.shape
    tk, kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    delta = (o.float() * grad_o.float()).sum(-1).transpose(1, 2)                  # [B, H, Tq]
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse = lse.float()
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).contiguous()
    q_start, k_start, k_end, windows, sinks = _tables(q, k, pattern, cu_seqlens)
    dims = _dims(q, k, v, pattern)
    dq = _nan(q.shape, q, torch.float32)
    cfg = launch_config(head_dim, value_dim, "bwd_dq", config_dtype(q.dtype))
    attention_bwd_dq_kernel[(triton.cdiv(tq, cfg.block_m), batch * heads)](
        q, k, v, grad_o, lse, delta, dq, q_start, k_start, windows, sinks, *dims,
        BM=cfg.block_m, BN=cfg.block_n, BD=cfg.block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dk_head = _nan((batch, tk, heads, head_dim), q, torch.float32)
    dv_head = _nan((batch, tk, heads, value_dim), q, torch.float32)
    cfg = launch_config(head_dim, value_dim, "bwd_dkv", config_dtype(q.dtype))
    attention_bwd_dkv_kernel[(triton.cdiv(tk, cfg.block_n), batch * heads)](
        q, k, v, grad_o, lse, delta, dk_head, dv_head, q_start, k_start, k_end, windows, sinks, *dims,
        BM=cfg.block_m, BN=cfg.block_n, BD=cfg.block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    group = heads // kv_heads
    dk = dk_head.view(batch, tk, kv_heads, group, head_dim).sum(3)
    dv = dv_head.view(batch, tk, kv_heads, group, value_dim).sum(3)
    return dq, dk, dv


def aot_specs(dtype: str, head_dims: list[tuple[int, int]] | None = None) -> list:
    """Every launch configuration of these kernels for element type `dtype` ("bf16"/"fp32"): one entry per
    distinct `launch_config(D, Dv, kernel)` over the supported head widths (or `head_dims`). Read by
    `lctrain.kernels.aot` and its test, so the compiled list is the launched one."""
    from lctrain.kernels.aot import AotSpec, pointer_attrs  # lazily: aot imports this module by name

    elem = f"*{dtype}"
    tables = {"q_start": "*i32", "k_start": "*i32"}
    spans = {"window_ptr": "*i32", "sink_ptr": "*i32"}
    dims = {"scale": "fp32", "TQ": "i32", "TK": "i32", "q_offset": "i32", "k_offset": "i32", "H": "i32",
            "HKV": "i32", "D": "i32", "DV": "i32"}
    blocks = {"BM": "constexpr", "BN": "constexpr", "BD": "constexpr"}
    signatures = {
        ("fwd", attention_fwd_kernel): {
            "q": elem, "k": elem, "v": elem, "o": elem, "lse": "*fp32", **tables, **spans, **dims, **blocks},
        ("bwd_dq", attention_bwd_dq_kernel): {
            "q": elem, "k": elem, "v": elem, "d_o": elem, "lse": "*fp32", "delta": "*fp32", "dq": "*fp32",
            **tables, **spans, **dims, **blocks},
        ("bwd_dkv", attention_bwd_dkv_kernel): {
            "q": elem, "k": elem, "v": elem, "d_o": elem, "lse": "*fp32", "delta": "*fp32", "dk_head": "*fp32",
            "dv_head": "*fp32", **tables, "k_end": "*i32", **spans, **dims, **blocks},
    }
    if head_dims is None:
        head_dims = [(d, d) for d in SUPPORTED_HEAD_DIMS]
    specs = []
    for (name, kernel), signature in signatures.items():
        for cfg in sorted({launch_config(d, dv, name, dtype) for d, dv in head_dims},
                          key=lambda c: (c.block_d, c.block_m, c.block_n)):
            label = f"{kernel.__name__}[BM={cfg.block_m},BN={cfg.block_n},BD={cfg.block_d},warps={cfg.num_warps}]"
            constexprs = {"BM": cfg.block_m, "BN": cfg.block_n, "BD": cfg.block_d}
            specs.append(AotSpec(kernel, signature, constexprs, cfg.num_warps, cfg.num_stages, label,
                                 pointer_attrs(kernel, signature)))
    return specs
