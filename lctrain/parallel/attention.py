"""Softmax attention over the whole sequence for a mixer holding only its shard of q, k, v.

Three strategies, all exact, all built on the attention op's block form (`lctrain.kernels.attention`: queries of
one chunk against keys of another with global causal / document masking, `(o, lse)` merged by log-sum-exp in
float32; backward recomputes each block from the merged `(o, lse)`). Blocks run in the input dtype (bf16 under
autocast) with float32 accumulation; which blocks to compute is decided on the host once per batch
(`attention_plan.BlockPlan`), so the loops read nothing back from the device and no `[T_local, T_local]` tensor
exists.
    allgather  (LASP-2H) AllGather K and V (GQA-sized), attend locally; backward reduce-scatters dK, dV.
    ulysses    all-to-all from sequence shards to head shards, full-sequence attention for H / W heads, and back.
    ring       K/V blocks travel around the SP ring (send/recv) while the previous one is computed; backward sends
               dK/dV around the ring back to their owner.
Traffic is counted as `attn` in `lctrain.parallel.comm`.
"""
from __future__ import annotations

import torch

from lctrain.parallel import comm
from lctrain.parallel.attention_plan import BlockPlan
from lctrain.parallel.sharding import ATTENTION_MODES as MODES
from lctrain.parallel.sharding import SPPlacement

KIND = "attn"


def _compute(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------ allgather
class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: BlockPlan):
        placement = plan.placement
        rank, d = placement.sp_rank, k.shape[-1]
        kv_all = comm.all_gather(torch.cat([k, v], dim=-1), placement.groups, KIND)   # [W, B, Tl, Hkv, D + Dv]
        partials = {}
        for src in range(placement.sp_size):
            k_s, v_s = kv_all[src].split([d, v.shape[-1]], dim=-1)
            plan.forward(q, k_s, v_s, rank, src, partials)
        o, lse = plan.assemble(partials, q, v.shape[-1])
        ctx.save_for_backward(q, kv_all, o, lse)
        ctx.plan, ctx.dims = plan, (d, v.shape[-1])
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, kv_all, o, lse = ctx.saved_tensors
        plan, dims = ctx.plan, ctx.dims
        placement = plan.placement
        dq = torch.zeros(q.shape, dtype=_compute(q), device=q.device)
        dkv_all = torch.zeros(kv_all.shape, dtype=_compute(q), device=q.device)
        grad_o = grad_o.contiguous()
        for src in range(placement.sp_size):
            k_s, v_s = kv_all[src].split(dims, dim=-1)
            dk_s, dv_s = dkv_all[src].split(dims, dim=-1)
            plan.backward(q, k_s, v_s, o, lse, grad_o, placement.sp_rank, src, dq, dk_s, dv_s)
        dkv = comm.reduce_scatter(dkv_all.to(kv_all.dtype), placement.groups, KIND)
        dk, dv = dkv.split(dims, dim=-1)
        return dq.to(q.dtype), dk, dv, None


# -------------------------------------------------------------------------------------------------- ulysses
def _heads_to_seq(x: torch.Tensor, groups) -> torch.Tensor:
    """`[W, B, Tl, h, D]` (row s: tokens of SP rank s, this rank's heads) -> `[B, Tl, W*h, D]` (this rank's
    tokens, every head)."""
    world, b, t, h, d = x.shape
    back = comm.all_to_all(x, groups, KIND)                      # row s: this rank's tokens, heads of rank s
    return back.permute(1, 2, 0, 3, 4).reshape(b, t, world * h, d)


def _seq_to_heads(x: torch.Tensor, world: int, groups) -> torch.Tensor:
    """`[B, Tl, W*h, D]` sequence shard -> `[W, B, Tl, h, D]` (row s: tokens of SP rank s, this rank's heads)."""
    b, t, heads, d = x.shape
    send = x.reshape(b, t, world, heads // world, d).permute(2, 0, 1, 3, 4)
    return comm.all_to_all(send, groups, KIND)


class _UlyssesAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: BlockPlan):
        placement = plan.placement
        world, groups = placement.sp_size, placement.groups
        hq, hkv = q.shape[2] // world, k.shape[2] // world
        # one all-to-all for q, k and v: pack their per-rank head groups side by side
        packed = torch.cat([x.reshape(x.shape[0], x.shape[1], world, -1, x.shape[3]) for x in (q, k, v)], dim=3)
        recv = comm.all_to_all(packed.permute(2, 0, 1, 3, 4), groups, KIND)      # [W, B, Tl, hq+2hkv, D]
        q_h, k_h, v_h = recv.split([hq, hkv, hkv], dim=3)
        outs, lses = [], []
        for a in range(world):
            partials = {}
            for b in range(world):
                plan.forward(q_h[a], k_h[b], v_h[b], a, b, partials)
            o, lse = plan.assemble(partials, q_h[a], v.shape[-1])
            outs.append(o)
            lses.append(lse)
        o_h, lse_h = torch.stack(outs), torch.stack(lses)                        # [W, B, Tl, hq, D], [W, B, hq, Tl]
        ctx.save_for_backward(q_h, k_h, v_h, o_h, lse_h)
        ctx.plan, ctx.in_dtype = plan, q.dtype
        return _heads_to_seq(o_h, groups)

    @staticmethod
    def backward(ctx, grad_o):
        q_h, k_h, v_h, o_h, lse_h = ctx.saved_tensors
        plan = ctx.plan
        placement = plan.placement
        world, groups = placement.sp_size, placement.groups
        grad_h = _seq_to_heads(grad_o.contiguous(), world, groups)              # [W, B, Tl, hq, D]
        dtype = _compute(q_h)
        dq_h = torch.zeros(q_h.shape, dtype=dtype, device=q_h.device)
        dk_h = torch.zeros(k_h.shape, dtype=dtype, device=q_h.device)
        dv_h = torch.zeros(v_h.shape, dtype=dtype, device=q_h.device)
        for a in range(world):
            for b in range(world):
                plan.backward(q_h[a], k_h[b], v_h[b], o_h[a], lse_h[a], grad_h[a], a, b, dq_h[a], dk_h[b], dv_h[b])
        hq, hkv = q_h.shape[3], k_h.shape[3]
        packed = torch.cat([dq_h, dk_h, dv_h], dim=3).to(ctx.in_dtype)           # [W, B, Tl, hq+2hkv, D]
        back = comm.all_to_all(packed, groups, KIND)                            # row s: my tokens, heads of s
        dq, dk, dv = back.split([hq, hkv, hkv], dim=3)

        def merge_heads(x):
            return x.permute(1, 2, 0, 3, 4).reshape(x.shape[1], x.shape[2], -1, x.shape[4])
        return merge_heads(dq), merge_heads(dk), merge_heads(dv), None


# ----------------------------------------------------------------------------------------------------- ring
class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: BlockPlan):
        placement = plan.placement
        world, rank, groups = placement.sp_size, placement.sp_rank, placement.groups
        dims = (k.shape[-1], v.shape[-1])
        kv = torch.cat([k, v], dim=-1)
        partials = {}
        for step in range(world):
            src = (rank - step) % world                  # owner of the block held at this step
            # post the next hop first: the block travels while this one is computed
            pending = comm.ring_shift_async(kv, groups, KIND) if step < world - 1 else None
            plan.forward(q, *kv.split(dims, dim=-1), rank, src, partials)
            if pending is not None:
                kv = pending.wait()
        o, lse = plan.assemble(partials, q, v.shape[-1])
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan = plan
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, o, lse = ctx.saved_tensors
        plan = ctx.plan
        placement = plan.placement
        world, rank, groups = placement.sp_size, placement.sp_rank, placement.groups
        dims = (k.shape[-1], v.shape[-1])
        grad_o = grad_o.contiguous()
        dq = torch.zeros(q.shape, dtype=_compute(q), device=q.device)
        kv = torch.cat([k, v], dim=-1)
        dkv = torch.zeros(kv.shape, dtype=_compute(q), device=q.device)   # gradient of the visiting block
        for step in range(world):
            src = (rank - step) % world
            pending = comm.ring_shift_async(kv, groups, KIND) if step < world - 1 else None
            plan.backward(q, *kv.split(dims, dim=-1), o, lse, grad_o, rank, src, dq, *dkv.split(dims, dim=-1))
            if pending is not None:
                kv = pending.wait()
            # after the last step the visiting block belongs to rank + 1: one more hop brings dK/dV home
            dkv = comm.ring_shift(dkv, groups, KIND)
        dk, dv = dkv.to(k.dtype).split(dims, dim=-1)
        return dq.to(q.dtype), dk, dv, None


# ------------------------------------------------------------------------------------------------ public
def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, placement: SPPlacement, mode: str | None = None,
                 scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Causal, document-masked softmax attention over the whole sharded sequence.

    q `[B, T_local, H, D]`, k / v `[B, T_local, Hkv, D]` (Hkv divides H) -> this rank's output
    `[B, T_local, H, D]`. mode: "allgather", "ulysses" (needs H and Hkv divisible by the SP size), "ring", or
    None for `placement.attention_mode`. scale defaults to D ** -0.5. backend: the attention op's (None: Triton on
    CUDA, torch otherwise). Collective over the SP group: every rank must call it with the same mode.
    """
    if mode is None and isinstance(placement, SPPlacement):
        mode = placement.attention_mode
    if mode not in MODES:
        raise ValueError(f"sp_attention: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(placement, SPPlacement):
        raise ValueError(f"sp_attention: placement must be an SPPlacement (from shard_batch), got {type(placement)}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"sp_attention: need q [B, T_local, H, D] and k, v [B, T_local, Hkv, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads != 0:
        raise ValueError(f"sp_attention: kv heads ({kv_heads}) must divide query heads ({heads})")
    if q.shape[1] != placement.local_len or q.shape[0] != placement.position_ids.shape[0]:
        raise ValueError(f"sp_attention: tensors hold [B={q.shape[0]}, T_local={q.shape[1]}] tokens but the "
                         f"placement has [B={placement.position_ids.shape[0]}, T_local={placement.local_len}]")
    world = placement.sp_size
    if mode == "ulysses" and (heads % world or kv_heads % world):
        raise ValueError(f"sp_attention: mode='ulysses' needs query heads ({heads}) and kv heads ({kv_heads}) "
                         f"divisible by the SP size {world}; use 'allgather' or 'ring' instead")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    plan = BlockPlan(placement, scale, backend)
    function = {"allgather": _AllGatherAttention, "ulysses": _UlyssesAttention, "ring": _RingAttention}[mode]
    return function.apply(q, k, v, plan)
