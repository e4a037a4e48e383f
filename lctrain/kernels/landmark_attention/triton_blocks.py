"""Autograd wrapper around the `landmark_attention` Triton kernels, and their ahead-of-time compile list.

Batched input `[B, T, H, D]` is viewed as one packed row `[B*T, H, D]` with offsets `0, T, 2T, ...`, so the
kernels only ever see the packed (`cu_seqlens`) layout; blocks restart at every sequence start. Head dims are
compile-time widths in the kernels (whole rows load unmasked and vectorised); heads narrower than their padded
width (`padded_dim`) are zero-padded here, which changes no score and only adds output columns that are dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from lctrain.kernels.addressing import check_row_stride
from lctrain.kernels.landmark_attention.triton_bwd import landmark_bwd_dkv_kernel, landmark_bwd_dq_kernel
from lctrain.kernels.landmark_attention.triton_config import (
    BLOCK_TILES,
    SUPPORTED_HEAD_DIMS,
    launch_config,
    padded_dim,
)
from lctrain.kernels.landmark_attention.triton_fwd import landmark_fwd_kernel
from lctrain.kernels.tiles import tile_table


def _nan_like(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Kernels must write every element they own; NaN makes a missed element visible instead of silent.
    return torch.full(shape, float("nan"), dtype=dtype, device=like.device)


def _query_tiles(host_offsets: torch.Tensor, block_size: int, block_m: int, device) -> torch.Tensor:
    """Tile table (`lctrain.kernels.tiles`) of the per-query-tile kernels: cdiv(block_size, BM) query tiles for
    each landmark block of each document, on the kernels' device."""
    return tile_table(host_offsets, block_size, triton.cdiv(block_size, block_m)).to(device, non_blocking=True)


def _blocks(host_offsets: torch.Tensor, block_size: int, device) -> torch.Tensor:
    """Tile table of the per-block kernel: every landmark block of each document."""
    return tile_table(host_offsets, block_size).to(device, non_blocking=True)


class LandmarkAttentionFunction(torch.autograd.Function):
    """Packed-layout landmark attention.

    forward(q, k `[T, H, W]`, v `[T, H, W]` (one padded width W for all three), block_size, scale,
            cu_seqlens int32 `[N+1]`, host_offsets: the same offsets on the host) -> o `[T, H, W]` (q's dtype).
    """

    @staticmethod
    def forward(ctx, q, k, v, block_size, scale, cu_seqlens, host_offsets):
        total, heads, head_dim = q.shape
        value_dim = v.shape[-1]
        cfg = launch_config(head_dim, value_dim, block_size, "fwd")
        assert (cfg.block_d, cfg.block_dv) == (head_dim, value_dim), "heads must come padded to their width"
        o = _nan_like((total, heads, value_dim), q, q.dtype)
        lse = _nan_like((total, heads), q, torch.float32)
        tiles = _query_tiles(host_offsets, block_size, cfg.block_m, q.device)
        landmark_fwd_kernel[(tiles.shape[0], heads)](
            q, k, v, o, lse, cu_seqlens, tiles, scale, heads, block_size,
            BM=cfg.block_m, BN=cfg.block_n, D=cfg.block_d, DV=cfg.block_dv,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.block_size = block_size
        ctx.scale = scale
        ctx.host_offsets = host_offsets
        return o

    @staticmethod
    def backward(ctx, d_o):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        total, heads, head_dim = q.shape
        value_dim = v.shape[-1]
        block_size = ctx.block_size
        d_o = d_o.contiguous()
        delta = (o.float() * d_o.float()).sum(-1).contiguous()  # [T, H]
        dq_cfg = launch_config(head_dim, value_dim, block_size, "bwd_dq")
        dq = _nan_like((total, heads, head_dim), q, torch.float32)
        tiles = _query_tiles(ctx.host_offsets, block_size, dq_cfg.block_m, q.device)
        landmark_bwd_dq_kernel[(tiles.shape[0], heads)](
            q, k, v, d_o, lse, delta, dq, cu_seqlens, tiles, ctx.scale, heads, block_size,
            BM=dq_cfg.block_m, BN=dq_cfg.block_n, D=dq_cfg.block_d, DV=dq_cfg.block_dv,
            num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages)
        dkv_cfg = launch_config(head_dim, value_dim, block_size, "bwd_dkv")
        dk = _nan_like((total, heads, head_dim), q, torch.float32)
        dv = _nan_like((total, heads, value_dim), q, torch.float32)
        tiles = _blocks(ctx.host_offsets, block_size, q.device)
        landmark_bwd_dkv_kernel[(tiles.shape[0], heads)](
            q, k, v, d_o, lse, delta, dk, dv, cu_seqlens, tiles, ctx.scale, heads, block_size,
            BM=dkv_cfg.block_m, BN=dkv_cfg.block_n, D=dkv_cfg.block_d, DV=dkv_cfg.block_dv,
            num_warps=dkv_cfg.num_warps, num_stages=dkv_cfg.num_stages)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def triton_landmark_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton landmark attention (inputs already validated; shapes as in `landmark_attention`).

    q, k `[B, T, H, D]`, v `[B, T, H, Dv]`, cu_seqlens `[N+1]` (B == 1) or None. Returns o `[B, T, H, Dv]` in
    q's dtype.
    """
    batch, length, heads, head_dim = q.shape
    value_dim = v.shape[-1]
    check_row_stride("landmark_attention", heads * padded_dim(max(head_dim, value_dim)))
    if cu_seqlens is None:
        host = torch.arange(0, batch + 1, dtype=torch.int32) * length
        cu_seqlens = host.to(q.device)
    else:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        host = cu_seqlens.cpu() if cu_seqlens_cpu is None else cu_seqlens_cpu  # no device read when given
    max_len = int((host[1:] - host[:-1]).max())
    if max_len == 0:
        return q.new_zeros(batch, length, heads, value_dim)
    width = padded_dim(max(head_dim, value_dim))
    q, k, v = (x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1])) for x in (q, k, v))
    o = LandmarkAttentionFunction.apply(
        q.reshape(batch * length, heads, width).contiguous(),
        k.reshape(batch * length, heads, width).contiguous(),
        v.reshape(batch * length, heads, width).contiguous(),
        block_size, float(scale), cu_seqlens, host)
    return o.view(batch, length, heads, width)[..., :value_dim]


def aot_specs(dtype: str, head_dims: list[int] | None = None, block_tiles: list[int] | None = None) -> list:
    """Every launch configuration of this module's kernels for q/k/v element type `dtype` ("bf16"/"fp32").

    One entry per distinct `launch_config(D, D, block_size, kernel)` over the supported padded head dims and
    padded block sizes (or over `head_dims` / `block_tiles` when given). Consumed by `lctrain.kernels.aot`.
    """
    from lctrain.kernels.aot import AotSpec, pointer_attrs  # imported lazily: aot imports this module by name

    elem = f"*{dtype}"
    dims = {"cu_seqlens": "*i32", "tiles": "*i32", "scale": "fp32", "H": "i32", "BLOCK": "i32"}
    tiles = {"BM": "constexpr", "BN": "constexpr", "D": "constexpr", "DV": "constexpr"}
    signatures = {
        ("fwd", landmark_fwd_kernel): {
            "q": elem, "k": elem, "v": elem, "o": elem, "lse": "*fp32", **dims, **tiles},
        ("bwd_dq", landmark_bwd_dq_kernel): {
            "q": elem, "k": elem, "v": elem, "d_o": elem, "lse": "*fp32", "delta": "*fp32", "dq": "*fp32",
            **dims, **tiles},
        ("bwd_dkv", landmark_bwd_dkv_kernel): {
            "q": elem, "k": elem, "v": elem, "d_o": elem, "lse": "*fp32", "delta": "*fp32", "dk": "*fp32",
            "dv": "*fp32", **dims, **tiles},
    }
    head_dims = list(SUPPORTED_HEAD_DIMS) if head_dims is None else head_dims
    block_tiles = list(BLOCK_TILES) if block_tiles is None else block_tiles
    specs = []
    for (direction, kernel), signature in signatures.items():
        configs = {launch_config(d, d, tile, direction) for d in head_dims for tile in block_tiles}
        for cfg in sorted(configs, key=lambda c: (c.block_d, c.block_n, c.block_m)):
            label = (f"{kernel.__name__}[BM={cfg.block_m},BN={cfg.block_n},BD={cfg.block_d},BDV={cfg.block_dv},"
                     f"warps={cfg.num_warps}]")
            constexprs = {"BM": cfg.block_m, "BN": cfg.block_n, "D": cfg.block_d, "DV": cfg.block_dv}
            specs.append(AotSpec(kernel, signature, constexprs, cfg.num_warps, cfg.num_stages, label,
                                 pointer_attrs(kernel, signature)))
    return specs
