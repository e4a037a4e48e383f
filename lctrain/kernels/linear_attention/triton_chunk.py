"""Autograd wrapper around the `linear_attention` Triton kernels, and their ahead-of-time compile list.

Batched input `[B, T, H, D]` is viewed as one packed row `[B*T, H, D]` with offsets `0, T, 2T, ...`, so the
kernels only ever see the packed (`cu_seqlens`) layout.
"""
from __future__ import annotations

import torch
import triton

from lctrain.kernels.addressing import check_row_stride
from lctrain.kernels.linear_attention.triton_bwd import (
    linear_attention_bwd_dkv_kernel,
    linear_attention_bwd_dq_kernel,
    linear_attention_dlog_decay_kernel,
)
from lctrain.kernels.linear_attention.triton_config import (
    SUPPORTED_KEY_DIMS,
    SUPPORTED_VALUE_DIMS,
    launch_config,
)
from lctrain.kernels.linear_attention.triton_fwd import linear_attention_fwd_kernel

_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _nan_like(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Kernels must write every element they own; NaN makes a missed element visible instead of silent.
    return torch.full(shape, float("nan"), dtype=dtype, device=like.device)


class LinearAttentionFunction(torch.autograd.Function):
    """Packed-layout linear attention.

    forward(q `[T, H, K]`, k `[T, H, K]`, v `[T, H, V]`, g `[T, H]` fp32 or None, scale,
            initial_state `[N, H, K, V]` or None, cu_seqlens int32 `[N+1]`)
    -> o `[T, H, V]` (q's dtype), final_state `[N, H, K, V]` fp32.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, cu_seqlens):
        total, heads, key_dim = q.shape
        value_dim = v.shape[-1]
        num_seqs = cu_seqlens.numel() - 1
        cfg = launch_config(key_dim, value_dim, _TRITON_DTYPE[q.dtype], "fwd")
        gates = g if g is not None else q.new_zeros(total, heads, dtype=torch.float32)
        entering = (initial_state.float().contiguous() if initial_state is not None
                    else q.new_zeros(num_seqs, heads, key_dim, value_dim, dtype=torch.float32))
        num_k_blocks, num_v_blocks = triton.cdiv(key_dim, cfg.block_k), triton.cdiv(value_dim, cfg.block_v)
        # Linear attention splits exactly over key blocks: each writes an fp32 partial output, summed here.
        o_part = _nan_like((num_k_blocks, total, heads, value_dim), q, torch.float32)
        final = _nan_like((num_seqs, heads, key_dim, value_dim), q, torch.float32)
        linear_attention_fwd_kernel[(num_seqs * heads, num_k_blocks * num_v_blocks)](
            q, k, v, gates, entering, o_part, final, cu_seqlens, scale, total, heads, key_dim, value_dim,
            BT=cfg.chunk, BK=cfg.block_k, BV=cfg.block_v, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        o = o_part.sum(0).to(q.dtype)
        ctx.save_for_backward(q, k, v, gates, entering, final, cu_seqlens)
        ctx.scale = scale
        ctx.dtype_name = _TRITON_DTYPE[q.dtype]
        ctx.has_decay = g is not None
        ctx.has_initial_state = initial_state is not None
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        return o, final

    @staticmethod
    def backward(ctx, d_o, d_final):
        q, k, v, gates, entering, final, cu_seqlens = ctx.saved_tensors
        total, heads, key_dim = q.shape
        value_dim = v.shape[-1]
        num_seqs = cu_seqlens.numel() - 1
        dq_cfg = launch_config(key_dim, value_dim, ctx.dtype_name, "bwd_dq")
        dkv_cfg = launch_config(key_dim, value_dim, ctx.dtype_name, "bwd_dkv")
        # Both backward kernels split K and V the same way, so the partial buffers line up.
        assert (dq_cfg.block_k, dq_cfg.block_v) == (dkv_cfg.block_k, dkv_cfg.block_v)
        num_k_blocks, num_v_blocks = triton.cdiv(key_dim, dq_cfg.block_k), triton.cdiv(value_dim, dq_cfg.block_v)
        grid = (num_seqs * heads, num_k_blocks * num_v_blocks)
        d_o = d_o.contiguous()
        d_final = torch.zeros_like(final) if d_final is None else d_final.float().contiguous()

        dq_part = _nan_like((num_v_blocks, total, heads, key_dim), q, torch.float32)
        dk_part = _nan_like((num_v_blocks, total, heads, key_dim), q, torch.float32)
        dv_part = _nan_like((num_k_blocks, total, heads, value_dim), q, torch.float32)
        d_entering = _nan_like((num_seqs, heads, key_dim, value_dim), q, torch.float32)
        linear_attention_bwd_dq_kernel[grid](
            q, k, v, gates, entering, d_o, dq_part, cu_seqlens, ctx.scale, total, heads, key_dim, value_dim,
            BT=dq_cfg.chunk, BK=dq_cfg.block_k, BV=dq_cfg.block_v, num_warps=dq_cfg.num_warps,
            num_stages=dq_cfg.num_stages)
        linear_attention_bwd_dkv_kernel[grid](
            q, k, v, gates, d_o, d_final, dk_part, dv_part, d_entering, cu_seqlens, ctx.scale, total, heads,
            key_dim, value_dim, BT=dkv_cfg.chunk, BK=dkv_cfg.block_k, BV=dkv_cfg.block_v,
            num_warps=dkv_cfg.num_warps, num_stages=dkv_cfg.num_stages)
        dq, dk, dv = dq_part.sum(0), dk_part.sum(0), dv_part.sum(0)

        dg = None
        if ctx.has_decay:
            final_term = (d_final * final).sum(dim=(-2, -1)).contiguous()  # <dS_T, S_T>, [N, H]
            dg = _nan_like((total, heads), q, torch.float32)
            dg_cfg = launch_config(key_dim, value_dim, ctx.dtype_name, "dlog_decay")
            linear_attention_dlog_decay_kernel[(num_seqs * heads,)](
                q, k, dq, dk, final_term, dg, cu_seqlens, heads, key_dim,
                BT=dg_cfg.chunk, BK=dg_cfg.block_k, num_warps=dg_cfg.num_warps, num_stages=dg_cfg.num_stages)
        d_initial = d_entering.to(ctx.initial_dtype) if ctx.has_initial_state else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, None, d_initial, None


def triton_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton linear attention (inputs already validated; shapes as in `linear_attention`).

    q, k `[B, T, H, K]`, v `[B, T, H, V]`, log_decay None / `[H]` / `[B, T, H]`, initial_state `[N, H, K, V]`,
    cu_seqlens `[N+1]` (B == 1) or None. Returns o `[B, T, H, V]` and the fp32 final state or None.
    """
    batch, length, heads, key_dim = q.shape
    check_row_stride("linear_attention", heads * max(key_dim, v.shape[-1]))
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, batch + 1, device=q.device, dtype=torch.int32) * length
    else:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    g = None
    if log_decay is not None:
        # A per-head decay is expanded here so autograd sums the per-token gradients back into [H].
        per_token = log_decay if log_decay.dim() == 3 else log_decay.view(1, 1, heads).expand(batch, length, heads)
        g = per_token.float().reshape(batch * length, heads).contiguous()
    o, final = LinearAttentionFunction.apply(
        q.reshape(batch * length, heads, key_dim).contiguous(),
        k.reshape(batch * length, heads, key_dim).contiguous(),
        v.reshape(batch * length, heads, v.shape[-1]).contiguous(),
        g, float(scale), initial_state, cu_seqlens)
    return o.view(batch, length, heads, -1), (final if output_final_state else None)


def aot_specs(dtype: str) -> list:
    """Every launch configuration of this module's kernels for q/k/v element type `dtype` ("bf16"/"fp32").

    One entry per distinct `launch_config(K, V, dtype, kernel)` over the supported head dims: exactly what
    `LinearAttentionFunction` can launch. Consumed by `lctrain.kernels.aot`.
    """
    from lctrain.kernels.aot import AotSpec, pointer_attrs  # imported lazily: aot imports this module by name

    elem = f"*{dtype}"
    common = {"cu_seqlens": "*i32", "scale": "fp32"}
    blocks = {"BT": "constexpr", "BK": "constexpr", "BV": "constexpr"}
    signatures = {
        ("fwd", linear_attention_fwd_kernel): {
            "q": elem, "k": elem, "v": elem, "g": "*fp32", "initial_state": "*fp32", "o_part": "*fp32",
            "final_state": "*fp32", **common, "total_tokens": "i32", "H": "i32", "K": "i32", "V": "i32", **blocks},
        ("bwd_dq", linear_attention_bwd_dq_kernel): {
            "q": elem, "k": elem, "v": elem, "g": "*fp32", "initial_state": "*fp32", "d_o": elem,
            "dq_part": "*fp32", **common, "total_tokens": "i32", "H": "i32", "K": "i32", "V": "i32", **blocks},
        ("bwd_dkv", linear_attention_bwd_dkv_kernel): {
            "q": elem, "k": elem, "v": elem, "g": "*fp32", "d_o": elem, "d_final_state": "*fp32",
            "dk_part": "*fp32", "dv_part": "*fp32", "d_initial_state": "*fp32", **common, "total_tokens": "i32",
            "H": "i32", "K": "i32", "V": "i32", **blocks},
    }
    specs = []
    for (direction, kernel), signature in signatures.items():
        configs = {launch_config(kd, vd, dtype, direction) for kd in SUPPORTED_KEY_DIMS for vd in SUPPORTED_VALUE_DIMS}
        for cfg in sorted(configs, key=lambda c: (c.block_k, c.block_v, c.chunk)):
            label = f"{kernel.__name__}[BT={cfg.chunk},BK={cfg.block_k},BV={cfg.block_v},warps={cfg.num_warps}]"
            specs.append(AotSpec(kernel, signature, {"BT": cfg.chunk, "BK": cfg.block_k, "BV": cfg.block_v},
                                 cfg.num_warps, cfg.num_stages, label, pointer_attrs(kernel, signature)))
    dg_signature = {"q": elem, "k": elem, "dq": "*fp32", "dk": "*fp32", "final_term": "*fp32", "dg": "*fp32",
                    "cu_seqlens": "*i32", "H": "i32", "K": "i32", "BT": "constexpr", "BK": "constexpr"}
    dg_configs = {launch_config(kd, 32, dtype, "dlog_decay") for kd in SUPPORTED_KEY_DIMS}
    for cfg in sorted(dg_configs, key=lambda c: (c.block_k, c.chunk)):
        label = f"linear_attention_dlog_decay_kernel[BT={cfg.chunk},BK={cfg.block_k},warps={cfg.num_warps}]"
        specs.append(AotSpec(linear_attention_dlog_decay_kernel, dg_signature, {"BT": cfg.chunk, "BK": cfg.block_k},
                             cfg.num_warps, cfg.num_stages, label,
                             pointer_attrs(linear_attention_dlog_decay_kernel, dg_signature)))
    return specs
