"""Autograd wrapper around the `local_attention` Triton kernels, and their ahead-of-time compile list.

Batched input `[B, T, H, D]` is viewed as one packed row `[B*T, H, D]` with offsets `0, T, 2T, ...`, so the
kernels only ever see the packed (`cu_seqlens`) layout and never copy documents into padded buffers.
"""
from __future__ import annotations

import torch

from lctrain.kernels.addressing import check_row_stride
from lctrain.kernels.local_attention.common import per_head_spans
from lctrain.kernels.local_attention.triton_bwd import (
    local_attention_bwd_dkv_kernel,
    local_attention_bwd_dq_kernel,
)
from lctrain.kernels.local_attention.triton_config import SUPPORTED_HEAD_DIMS, launch_config
from lctrain.kernels.local_attention.triton_fwd import local_attention_fwd_kernel
from lctrain.kernels.tiles import tile_table


def _nan_like(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Kernels must write every element they own; NaN makes a missed element visible instead of silent.
    return torch.full(shape, float("nan"), dtype=dtype, device=like.device)


def _tiles(host_offsets: torch.Tensor, tile: int, device) -> torch.Tensor:
    """The tile table (`lctrain.kernels.tiles`) of `tile`-token blocks, on the kernels' device."""
    return tile_table(host_offsets, tile).to(device, non_blocking=True)


class LocalAttentionFunction(torch.autograd.Function):
    """Packed-layout local attention.

    forward(q `[T, H, D]`, k `[T, Hkv, D]`, v `[T, Hkv, Dv]`, window/sink int32 `[H]`, scale,
            cu_seqlens int32 `[N+1]`, host_offsets: the same offsets on the host) -> o `[T, H, Dv]` (q's dtype).
    """

    @staticmethod
    def forward(ctx, q, k, v, window, sink, scale, cu_seqlens, host_offsets):
        total, heads, head_dim = q.shape
        kv_heads, value_dim = v.shape[1], v.shape[2]
        cfg = launch_config(head_dim, value_dim, "fwd")
        o = _nan_like((total, heads, value_dim), q, q.dtype)
        lse = _nan_like((total, heads), q, torch.float32)
        tiles = _tiles(host_offsets, cfg.block_m, q.device)
        local_attention_fwd_kernel[(tiles.shape[0], heads)](
            q, k, v, o, lse, window, sink, cu_seqlens, tiles, scale, heads, kv_heads, head_dim, value_dim,
            BM=cfg.block_m, BN=cfg.block_n, BD=cfg.block_d, BDV=cfg.block_dv,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        ctx.save_for_backward(q, k, v, o, lse, window, sink, cu_seqlens)
        ctx.scale = scale
        ctx.host_offsets = host_offsets
        return o

    @staticmethod
    def backward(ctx, d_o):
        q, k, v, o, lse, window, sink, cu_seqlens = ctx.saved_tensors
        total, heads, head_dim = q.shape
        kv_heads, value_dim = v.shape[1], v.shape[2]
        d_o = d_o.contiguous()
        delta = (o.float() * d_o.float()).sum(-1).contiguous()  # [T, H]
        dq_cfg = launch_config(head_dim, value_dim, "bwd_dq")
        dq = _nan_like((total, heads, head_dim), q, torch.float32)
        tiles = _tiles(ctx.host_offsets, dq_cfg.block_m, q.device)
        local_attention_bwd_dq_kernel[(tiles.shape[0], heads)](
            q, k, v, d_o, lse, delta, dq, window, sink, cu_seqlens, tiles, ctx.scale, heads, kv_heads, head_dim,
            value_dim, BM=dq_cfg.block_m, BN=dq_cfg.block_n, BD=dq_cfg.block_d, BDV=dq_cfg.block_dv,
            num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages)
        dkv_cfg = launch_config(head_dim, value_dim, "bwd_dkv")
        dk_head = _nan_like((total, heads, head_dim), q, torch.float32)
        dv_head = _nan_like((total, heads, value_dim), q, torch.float32)
        tiles = _tiles(ctx.host_offsets, dkv_cfg.block_n, q.device)
        local_attention_bwd_dkv_kernel[(tiles.shape[0], heads)](
            q, k, v, d_o, lse, delta, dk_head, dv_head, window, sink, cu_seqlens, tiles, ctx.scale, heads,
            kv_heads, head_dim, value_dim, BM=dkv_cfg.block_m, BN=dkv_cfg.block_n, BD=dkv_cfg.block_d,
            BDV=dkv_cfg.block_dv, num_warps=dkv_cfg.num_warps, num_stages=dkv_cfg.num_stages)
        group = heads // kv_heads
        dk = dk_head.view(total, kv_heads, group, head_dim).sum(2)
        dv = dv_head.view(total, kv_heads, group, value_dim).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def triton_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | torch.Tensor,
    sink: int | torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton local attention (inputs already validated; shapes as in `local_attention`).

    q `[B, T, H, D]`, k `[B, T, Hkv, D]`, v `[B, T, Hkv, Dv]`, window/sink ints or int `[H]`, cu_seqlens
    `[N+1]` (B == 1) or None. Returns o `[B, T, H, Dv]` in q's dtype.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads, value_dim = k.shape[2], v.shape[-1]
    check_row_stride("local_attention", heads * max(head_dim, value_dim))
    if cu_seqlens is None:
        host = torch.arange(0, batch + 1, dtype=torch.int32) * length
        cu_seqlens = host.to(q.device)
    else:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        host = cu_seqlens.cpu() if cu_seqlens_cpu is None else cu_seqlens_cpu  # no device read when given
    max_len = int((host[1:] - host[:-1]).max())
    windows, sinks = per_head_spans(window, sink, heads, q.device)
    # Spans beyond the longest document change nothing; clamping keeps every loop bound inside int32.
    windows = windows.clamp(max=max(max_len, 1)).to(torch.int32).contiguous()
    sinks = sinks.clamp(max=max(max_len, 1)).to(torch.int32).contiguous()
    if max_len == 0:
        return q.new_zeros(batch, length, heads, value_dim)
    o = LocalAttentionFunction.apply(
        q.reshape(batch * length, heads, head_dim).contiguous(),
        k.reshape(batch * length, kv_heads, head_dim).contiguous(),
        v.reshape(batch * length, kv_heads, value_dim).contiguous(),
        windows, sinks, float(scale), cu_seqlens, host)
    return o.view(batch, length, heads, value_dim)


def aot_specs(dtype: str, head_dims: list[tuple[int, int]] | None = None) -> list:
    """Every launch configuration of this module's kernels for q/k/v element type `dtype` ("bf16"/"fp32").

    One entry per distinct `launch_config(D, Dv, kernel)` over the supported padded head dims (or over
    `head_dims`, a list of `(D, Dv)`, when given). Consumed by `lctrain.kernels.aot`.
    """
    from lctrain.kernels.aot import AotSpec, pointer_attrs  # imported lazily: aot imports this module by name

    elem = f"*{dtype}"
    spans = {"window_ptr": "*i32", "sink_ptr": "*i32", "cu_seqlens": "*i32"}
    dims = {"scale": "fp32", "H": "i32", "HKV": "i32", "D": "i32", "DV": "i32"}
    blocks = {"BM": "constexpr", "BN": "constexpr", "BD": "constexpr", "BDV": "constexpr"}
    signatures = {
        ("fwd", local_attention_fwd_kernel): {
            "q": elem, "k": elem, "v": elem, "o": elem, "lse": "*fp32", **spans, "tiles": "*i32", **dims, **blocks},
        ("bwd_dq", local_attention_bwd_dq_kernel): {
            "q": elem, "k": elem, "v": elem, "d_o": elem, "lse": "*fp32", "delta": "*fp32", "dq": "*fp32",
            **spans, "tiles": "*i32", **dims, **blocks},
        ("bwd_dkv", local_attention_bwd_dkv_kernel): {
            "q": elem, "k": elem, "v": elem, "d_o": elem, "lse": "*fp32", "delta": "*fp32", "dk_head": "*fp32",
            "dv_head": "*fp32", **spans, "tiles": "*i32", **dims, **blocks},
    }
    if head_dims is None:
        head_dims = [(d, d) for d in SUPPORTED_HEAD_DIMS]
    specs = []
    for (direction, kernel), signature in signatures.items():
        configs = {launch_config(d, dv, direction) for d, dv in head_dims}
        for cfg in sorted(configs, key=lambda c: (c.block_d, c.block_dv, c.block_m, c.block_n)):
            label = (f"{kernel.__name__}[BM={cfg.block_m},BN={cfg.block_n},BD={cfg.block_d},BDV={cfg.block_dv},"
                     f"warps={cfg.num_warps}]")
            constexprs = {"BM": cfg.block_m, "BN": cfg.block_n, "BD": cfg.block_d, "BDV": cfg.block_dv}
            specs.append(AotSpec(kernel, signature, constexprs, cfg.num_warps, cfg.num_stages, label,
                                 pointer_attrs(kernel, signature)))
    return specs
