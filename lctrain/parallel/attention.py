"""Softmax attention over the whole sequence for a mixer holding only its shard of q, k, v.

Three strategies, all exact (causal + document masks from global token indices and document ids):
    allgather  (LASP-2H) AllGather K and V (GQA-sized), attend locally; backward reduce-scatters dK, dV.
    ulysses    all-to-all from sequence shards to head shards, full-sequence attention for H / W heads, and back.
    ring       K/V blocks travel around the SP ring (send/recv); partial results merge by log-sum-exp; blocks
               with nothing visible are skipped; backward sends dK/dV around the ring back to their owner.
Traffic is counted as `attn` in `lctrain.parallel.comm`.
"""
from __future__ import annotations

import torch

from lctrain.parallel import comm
from lctrain.parallel.attention_blocks import block_backward, block_forward, block_mask, merge, output_delta
from lctrain.parallel.sharding import ATTENTION_MODES as MODES
from lctrain.parallel.sharding import SPPlacement

KIND = "attn"


def _index_and_docs(placement: SPPlacement, sp_rank: int):
    index = placement.global_index(sp_rank)
    return index, placement.doc_ids[:, index]


def _mask(placement: SPPlacement, q_rank: int, k_rank: int) -> torch.Tensor:
    return block_mask(*_index_and_docs(placement, q_rank), *_index_and_docs(placement, k_rank))


# ------------------------------------------------------------------------------------------------ allgather
class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, placement: SPPlacement, scale: float):
        groups, rank = placement.groups, placement.sp_rank
        kv_all = comm.all_gather(torch.cat([k, v], dim=-1), groups, KIND)          # [W, B, Tl, Hkv, 2D]
        o = lse = None
        for src in range(placement.sp_size):
            mask = _mask(placement, rank, src)
            if mask.any():
                k_s, v_s = kv_all[src].split(k.shape[-1], dim=-1)
                o, lse = merge(o, lse, *block_forward(q, k_s, v_s, mask, scale))
        ctx.save_for_backward(q, kv_all, o, lse)
        ctx.placement, ctx.scale, ctx.head_dim = placement, scale, k.shape[-1]
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_o):
        q, kv_all, o, lse = ctx.saved_tensors
        placement, scale, d = ctx.placement, ctx.scale, ctx.head_dim
        delta = output_delta(o, grad_o)
        dq = torch.zeros_like(o)
        dkv_all = kv_all.new_zeros(kv_all.shape, dtype=o.dtype)
        for src in range(placement.sp_size):
            mask = _mask(placement, placement.sp_rank, src)
            if mask.any():
                k_s, v_s = kv_all[src].split(d, dim=-1)
                dq_s, dk_s, dv_s = block_backward(q, k_s, v_s, mask, scale, lse, grad_o, delta)
                dq += dq_s
                dkv_all[src] = torch.cat([dk_s, dv_s], dim=-1)
        dkv = comm.reduce_scatter(dkv_all.to(kv_all.dtype), placement.groups, KIND)
        dk, dv = dkv.split(d, dim=-1)
        return dq.to(q.dtype), dk, dv, None, None


# -------------------------------------------------------------------------------------------------- ulysses
def _seq_to_heads(x: torch.Tensor, world: int, groups) -> torch.Tensor:
    """`[B, Tl, W*h, D]` sequence shard -> `[W, B, Tl, h, D]` (row s: tokens of SP rank s, this rank's heads)."""
    b, t, heads, d = x.shape
    send = x.reshape(b, t, world, heads // world, d).permute(2, 0, 1, 3, 4)
    return comm.all_to_all(send, groups, KIND)


def _heads_to_seq(x: torch.Tensor, groups) -> torch.Tensor:
    """Inverse of `_seq_to_heads`: `[W, B, Tl, h, D]` (row s: tokens of SP rank s) -> `[B, Tl, W*h, D]`."""
    world, b, t, h, d = x.shape
    back = comm.all_to_all(x, groups, KIND)                      # row s: this rank's tokens, heads of rank s
    return back.permute(1, 2, 0, 3, 4).reshape(b, t, world * h, d)


class _UlyssesAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, placement: SPPlacement, scale: float):
        world, groups = placement.sp_size, placement.groups
        hq, hkv = q.shape[2] // world, k.shape[2] // world
        # one all-to-all for q, k and v: pack their per-rank head groups side by side
        packed = torch.cat([x.reshape(x.shape[0], x.shape[1], world, -1, x.shape[3]) for x in (q, k, v)], dim=3)
        recv = comm.all_to_all(packed.permute(2, 0, 1, 3, 4), groups, KIND)      # [W, B, Tl, hq+2hkv, D]
        q_h, k_h, v_h = recv.split([hq, hkv, hkv], dim=3)
        outs, lses = [], []
        for a in range(world):
            o = lse = None
            for b in range(world):
                mask = _mask(placement, a, b)
                if mask.any():
                    o, lse = merge(o, lse, *block_forward(q_h[a], k_h[b], v_h[b], mask, scale))
            outs.append(o)
            lses.append(lse)
        o_h = torch.stack(outs)                                                 # [W, B, Tl, hq, D]
        ctx.save_for_backward(q_h, k_h, v_h, o_h, torch.stack(lses))
        ctx.placement, ctx.scale, ctx.in_dtype = placement, scale, q.dtype
        return _heads_to_seq(o_h.to(q.dtype), groups)

    @staticmethod
    def backward(ctx, grad_o):
        q_h, k_h, v_h, o_h, lse = ctx.saved_tensors
        placement, scale = ctx.placement, ctx.scale
        world, groups = placement.sp_size, placement.groups
        grad_h = _seq_to_heads(grad_o, world, groups)                           # [W, B, Tl, hq, D]
        dq_h = torch.zeros_like(o_h)
        dk_h = k_h.new_zeros(k_h.shape, dtype=o_h.dtype)
        dv_h = v_h.new_zeros(v_h.shape, dtype=o_h.dtype)
        for a in range(world):
            delta = output_delta(o_h[a], grad_h[a])
            for b in range(world):
                mask = _mask(placement, a, b)
                if mask.any():
                    dq, dk, dv = block_backward(q_h[a], k_h[b], v_h[b], mask, scale, lse[a], grad_h[a], delta)
                    dq_h[a] += dq
                    dk_h[b] += dk
                    dv_h[b] += dv
        hq, hkv = q_h.shape[3], k_h.shape[3]
        packed = torch.cat([dq_h, dk_h, dv_h], dim=3).to(ctx.in_dtype)           # [W, B, Tl, hq+2hkv, D]
        back = comm.all_to_all(packed, groups, KIND)                            # row s: my tokens, heads of s
        dq, dk, dv = back.split([hq, hkv, hkv], dim=3)

        def merge_heads(x):
            return x.permute(1, 2, 0, 3, 4).reshape(x.shape[1], x.shape[2], -1, x.shape[4])
        return merge_heads(dq), merge_heads(dk), merge_heads(dv), None, None


# ----------------------------------------------------------------------------------------------------- ring
class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, placement: SPPlacement, scale: float):
        world, rank, groups = placement.sp_size, placement.sp_rank, placement.groups
        kv = torch.cat([k, v], dim=-1)
        o = lse = None
        for step in range(world):
            src = (rank - step) % world                  # owner of the block held at this step
            # post the next hop first: the block travels while this one is computed
            pending = comm.ring_shift_async(kv, groups, KIND) if step < world - 1 else None
            mask = _mask(placement, rank, src)
            if mask.any():
                k_s, v_s = kv.split(k.shape[-1], dim=-1)
                o, lse = merge(o, lse, *block_forward(q, k_s, v_s, mask, scale))
            if pending is not None:
                kv = pending.wait()
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.placement, ctx.scale = placement, scale
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, o, lse = ctx.saved_tensors
        placement, scale = ctx.placement, ctx.scale
        world, rank, groups = placement.sp_size, placement.sp_rank, placement.groups
        d = k.shape[-1]
        delta = output_delta(o, grad_o)
        dq = torch.zeros_like(o)
        kv = torch.cat([k, v], dim=-1)
        dkv = kv.new_zeros(kv.shape, dtype=o.dtype)     # gradient of the visiting block, travels with it
        for step in range(world):
            src = (rank - step) % world
            pending = comm.ring_shift_async(kv, groups, KIND) if step < world - 1 else None
            mask = _mask(placement, rank, src)
            if mask.any():
                k_s, v_s = kv.split(d, dim=-1)
                dq_s, dk_s, dv_s = block_backward(q, k_s, v_s, mask, scale, lse, grad_o, delta)
                dq += dq_s
                dkv += torch.cat([dk_s, dv_s], dim=-1)
            if pending is not None:
                kv = pending.wait()
            # after the last step the visiting block belongs to rank + 1: one more hop brings dK/dV home
            dkv = comm.ring_shift(dkv, groups, KIND)
        dk, dv = dkv.to(k.dtype).split(d, dim=-1)
        return dq.to(q.dtype), dk, dv, None, None


# ------------------------------------------------------------------------------------------------ public
def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, placement: SPPlacement, mode: str | None = None,
                 scale: float | None = None) -> torch.Tensor:
    """Causal, document-masked softmax attention over the whole sharded sequence.

    q `[B, T_local, H, D]`, k / v `[B, T_local, Hkv, D]` (Hkv divides H) -> this rank's output
    `[B, T_local, H, D]`. mode: "allgather", "ulysses" (needs H and Hkv divisible by the SP size), "ring", or
    None for `placement.attention_mode`. scale defaults to D ** -0.5. Collective over the SP group: every rank
    must call it with the same mode.
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
    function = {"allgather": _AllGatherAttention, "ulysses": _UlyssesAttention, "ring": _RingAttention}[mode]
    return function.apply(q, k, v, placement, scale)
