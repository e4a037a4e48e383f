"""Autograd wrapper around the `taylor_linear_attention` Triton kernels, and their ahead-of-time compile list.

Batched input `[B, T, H, D]` is viewed as one packed row `[B*T, H, D]` with offsets `0, T, 2T, ...`, so the
kernels only ever see the packed (`cu_seqlens`) layout. Block sizes are a pure function of the feature dim
(`launch_config`), so `aot_specs` lists exactly what a launch can use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from lctrain.kernels.addressing import check_row_stride
from lctrain.kernels.taylor_linear_attention.common import MAX_FEATURE_DIM, state_rows
from lctrain.kernels.taylor_linear_attention.triton_bwd import taylor_bwd_dkv_kernel, taylor_bwd_dq_kernel
from lctrain.kernels.taylor_linear_attention.triton_fwd import taylor_fwd_kernel

# D is padded to 16 (D <= 16) or 32 (17 <= D <= 32, the op's whole range). The 32-wide block runs narrower value
# tiles and more warps (see `launch_config`): with the D <= 16 tiles the dk/dv kernel spills on sm_90.
MAX_TRITON_FEATURE_DIM = 32
SUPPORTED_FEATURE_BLOCKS = (16, 32)
KERNELS = ("fwd", "bwd_dq", "bwd_dkv")


@dataclass(frozen=True)
class LaunchConfig:
    """chunk: tokens per chunk (BT). block_d: padded feature dim (BD). block_v: value columns per program."""

    chunk: int
    block_d: int
    block_v: int
    num_warps: int
    num_stages: int


def launch_config(feature_dim: int, kernel: str) -> LaunchConfig:
    """Configuration of `kernel` (one of `KERNELS`) for feature dim D <= 32. Spill-free on sm_80/sm_90 in bf16
    and fp32 (checked by `python -m lctrain.kernels.aot`); the backward kernels hold more [BT, BT] tiles and use
    shorter chunks.

    D <= 16 (BD=16): fwd BT=64, backward BT=32, BV=32, 4 warps.
    17 <= D <= 32 (BD=32): BV=16 and 8 warps throughout; fwd BT=64, dq BT=32, dk/dv BT=16 (the dk/dv kernel
    holds the most operands: with BT=32 or BV=32 it spills 8-40 bytes on sm_90, measured with the checker).
    dq and dk/dv must share BV (their per-value-block partial buffers line up); their chunks may differ."""
    if not 1 <= feature_dim <= MAX_TRITON_FEATURE_DIM:
        raise ValueError(f"taylor_linear_attention: backend='triton' supports feature dim D <= "
                         f"{MAX_TRITON_FEATURE_DIM}, got D={feature_dim}; use backend='torch' (D <= {MAX_FEATURE_DIM})")
    if kernel not in KERNELS:
        raise ValueError(f"taylor_linear_attention: kernel={kernel!r} is not one of {KERNELS}")
    block_d = max(16, triton.next_power_of_2(feature_dim))
    if block_d == 16:
        chunk = 64 if kernel == "fwd" else 32
        return LaunchConfig(chunk=chunk, block_d=16, block_v=32, num_warps=4, num_stages=1)
    chunk = {"fwd": 64, "bwd_dq": 32, "bwd_dkv": 16}[kernel]
    return LaunchConfig(chunk=chunk, block_d=block_d, block_v=16, num_warps=8, num_stages=1)


def _nan_like(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    # Kernels must write every element they own; NaN makes a missed element visible instead of silent.
    return torch.full(shape, float("nan"), dtype=torch.float32, device=like.device)


class TaylorLinearAttentionFunction(torch.autograd.Function):
    """Packed-layout Taylor linear attention without the normalising division.

    forward(q `[T, H, D]`, k `[T, H, D]`, v `[T, H, V]`, scale, initial_state `[N, H, F, V+1]` or None,
            cu_seqlens int32 `[N+1]`) -> y `[T, H, V+1]` fp32 (numerator | normaliser), final state
            `[N, H, F, V+1]` fp32.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, initial_state, cu_seqlens):
        total, heads, feature_dim = q.shape
        value_dim = v.shape[-1]
        num_seqs = cu_seqlens.numel() - 1
        shape = (num_seqs, heads, state_rows(feature_dim), value_dim + 1)
        # The kernel updates the state in place, starting from the initial state.
        final = (initial_state.float().clone().contiguous() if initial_state is not None
                 else q.new_zeros(shape, dtype=torch.float32))
        cfg = launch_config(feature_dim, "fwd")
        y = _nan_like((total, heads, value_dim + 1), q)
        taylor_fwd_kernel[(num_seqs * heads, triton.cdiv(value_dim + 1, cfg.block_v))](
            q, k, v, y, final, cu_seqlens, scale, heads, feature_dim, value_dim,
            BT=cfg.chunk, BD=cfg.block_d, BV=cfg.block_v, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        ctx.save_for_backward(q, k, v, initial_state if initial_state is not None else None, cu_seqlens)
        ctx.scale = scale
        ctx.state_shape = shape
        return y, final

    @staticmethod
    def backward(ctx, d_y, d_final):
        q, k, v, initial_state, cu_seqlens = ctx.saved_tensors
        total, heads, feature_dim = q.shape
        value_dim = v.shape[-1]
        num_seqs = cu_seqlens.numel() - 1
        d_y = d_y.float().contiguous()
        dq_cfg = launch_config(feature_dim, "bwd_dq")
        dkv_cfg = launch_config(feature_dim, "bwd_dkv")
        assert dq_cfg.block_v == dkv_cfg.block_v  # the partial buffers line up
        num_v_blocks = triton.cdiv(value_dim + 1, dq_cfg.block_v)
        grid = (num_seqs * heads, num_v_blocks)

        scratch = (initial_state.float().clone().contiguous() if initial_state is not None
                   else q.new_zeros(ctx.state_shape, dtype=torch.float32))
        dq_part = _nan_like((num_v_blocks, total, heads, feature_dim), q)
        taylor_bwd_dq_kernel[grid](
            q, k, v, d_y, scratch, dq_part, cu_seqlens, ctx.scale, total, heads, feature_dim, value_dim,
            BT=dq_cfg.chunk, BD=dq_cfg.block_d, BV=dq_cfg.block_v, num_warps=dq_cfg.num_warps,
            num_stages=dq_cfg.num_stages)
        # Carries dL/dS backward in time, from the final-state gradient to the initial-state gradient.
        d_state = (d_final.float().clone().contiguous() if d_final is not None
                   else q.new_zeros(ctx.state_shape, dtype=torch.float32))
        dk_part = _nan_like((num_v_blocks, total, heads, feature_dim), q)
        dv = _nan_like((total, heads, value_dim), q)
        taylor_bwd_dkv_kernel[grid](
            q, k, v, d_y, d_state, dk_part, dv, cu_seqlens, ctx.scale, total, heads, feature_dim, value_dim,
            BT=dkv_cfg.chunk, BD=dkv_cfg.block_d, BV=dkv_cfg.block_v, num_warps=dkv_cfg.num_warps,
            num_stages=dkv_cfg.num_stages)
        d_initial = d_state.to(initial_state.dtype) if initial_state is not None else None
        return (dq_part.sum(0).to(q.dtype), dk_part.sum(0).to(k.dtype), dv.to(v.dtype), None, d_initial, None)


def triton_taylor_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton Taylor linear attention (inputs already validated; shapes as in `taylor_linear_attention`).

    Returns y `[B, T, H, V+1]` fp32 (numerator | normaliser) and the final state `[N, H, F, V+1]` fp32.
    """
    batch, length, heads, feature_dim = q.shape
    check_row_stride("taylor_linear_attention", heads * max(feature_dim, v.shape[-1] + 1))
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, batch + 1, device=q.device, dtype=torch.int32) * length
    else:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    y, final = TaylorLinearAttentionFunction.apply(
        q.reshape(batch * length, heads, feature_dim).contiguous(),
        k.reshape(batch * length, heads, feature_dim).contiguous(),
        v.reshape(batch * length, heads, v.shape[-1]).contiguous(),
        float(scale), initial_state, cu_seqlens)
    return y.view(batch, length, heads, -1), final


def aot_specs(dtype: str, feature_blocks: tuple[int, ...] = SUPPORTED_FEATURE_BLOCKS) -> list:
    """Every launch configuration of this module's kernels for q/k/v element type `dtype` ("bf16"/"fp32"),
    over the padded feature dims `feature_blocks`. Consumed by `lctrain.kernels.aot`."""
    from lctrain.kernels.aot import AotSpec, pointer_attrs  # imported lazily: aot imports this module by name

    elem = f"*{dtype}"
    tail = {"cu_seqlens": "*i32", "scale": "fp32"}
    blocks = {"BT": "constexpr", "BD": "constexpr", "BV": "constexpr"}
    signatures = {
        ("fwd", taylor_fwd_kernel): {
            "q": elem, "k": elem, "v": elem, "y": "*fp32", "state": "*fp32", **tail,
            "H": "i32", "D": "i32", "V": "i32", **blocks},
        ("bwd_dq", taylor_bwd_dq_kernel): {
            "q": elem, "k": elem, "v": elem, "dy": "*fp32", "state": "*fp32", "dq_part": "*fp32", **tail,
            "total_tokens": "i32", "H": "i32", "D": "i32", "V": "i32", **blocks},
        ("bwd_dkv", taylor_bwd_dkv_kernel): {
            "q": elem, "k": elem, "v": elem, "dy": "*fp32", "d_state": "*fp32", "dk_part": "*fp32",
            "dv": "*fp32", **tail, "total_tokens": "i32", "H": "i32", "D": "i32", "V": "i32", **blocks},
    }
    specs = []
    for (direction, kernel), signature in signatures.items():
        for cfg in sorted({launch_config(block, direction) for block in feature_blocks}, key=lambda c: c.block_d):
            label = f"{kernel.__name__}[BT={cfg.chunk},BD={cfg.block_d},BV={cfg.block_v},warps={cfg.num_warps}]"
            specs.append(AotSpec(kernel, signature, {"BT": cfg.chunk, "BD": cfg.block_d, "BV": cfg.block_v},
                                 cfg.num_warps, cfg.num_stages, label, pointer_attrs(kernel, signature)))
    return specs
