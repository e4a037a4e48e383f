"""Landmark attention (`lctrain.kernels.landmark_attention`) for a mixer holding only its shard of the sequence.

Like LASP-2H's attention: K and V (KV-head sized) are AllGathered, the local queries attend the whole row with
the global block structure (blocks of `block_size` counted from each document's start, the last token of each
complete block its landmark), and backward reduce-scatters dK, dV. The local queries of each document piece
read that document's keys up to the piece's end, in the dense grouped-softmax form of the op's reference:

    own group:  non-landmark keys j <= i of i's block, plus the landmark of every earlier block (one softmax,
                whose landmark weights are the gates g_ic);
    block c < block(i):  g_ic * softmax over block c's non-landmark keys;   landmarks carry no values.

Memory per piece is O(queries x document prefix), as for all-gathered attention. Traffic is counted as `attn`.
"""
from __future__ import annotations

import torch

from lctrain.parallel import comm
from lctrain.parallel.local_sp import _document_pieces, _document_starts
from lctrain.parallel.sharding import SPPlacement

KIND = "attn"


class _GatherRow(torch.autograd.Function):
    """x_local `[B, T_local, ...]` -> the whole row `[B, T_pad, ...]` in global order; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x_local, placement: SPPlacement):
        gathered = comm.all_gather(x_local, placement.groups, KIND)              # [W, B, T_local, ...]
        full = x_local.new_empty((x_local.shape[0], placement.seq_len) + tuple(x_local.shape[2:]))
        for rank in range(placement.sp_size):
            full[:, placement.global_index(rank)] = gathered[rank]
        ctx.placement = placement
        return full

    @staticmethod
    def backward(ctx, grad_full):
        placement = ctx.placement
        per_rank = torch.stack([grad_full[:, placement.global_index(rank)] for rank in range(placement.sp_size)])
        return comm.reduce_scatter(per_rank, placement.groups, KIND), None


def _piece(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, block_size: int, scale: float):
    """Queries at document offsets `start .. start + n - 1` (q `[n, H, D]`) against the document's keys
    `[0, start + n)` (k `[L, H, D]`, v `[L, H, V]`) -> `[n, H, V]`."""
    n, length = q.shape[0], k.shape[0]
    device = q.device
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("nhd,lhd->hnl", q.to(compute), k.to(compute)) * scale              # [H, n, L]
    query = torch.arange(start, start + n, device=device)
    key = torch.arange(length, device=device)
    query_block, key_block = query // block_size, key // block_size
    is_landmark = key % block_size == block_size - 1
    own = (key_block[None, :] == query_block[:, None]) & (key[None, :] <= query[:, None]) & ~is_landmark[None, :]
    earlier_landmark = is_landmark[None, :] & (key_block[None, :] < query_block[:, None])
    group = torch.softmax(scores.masked_fill(~(own | earlier_landmark), float("-inf")), dim=-1)
    out = torch.einsum("hnl,lhv->nhv", group * own, v.to(compute))
    blocks = int(query_block.max())                  # earlier blocks are complete: they end before any query
    if blocks > 0:
        span = blocks * block_size
        inner = scores[..., :span].unflatten(-1, (blocks, block_size))[..., :-1]             # [H, n, c, bs-1]
        inner = torch.softmax(inner, dim=-1)
        gates = group[..., block_size - 1:span:block_size]                                  # [H, n, c]
        members = v[:span].to(compute).unflatten(0, (blocks, block_size))[:, :-1]           # [c, bs-1, H, V]
        out = out + torch.einsum("hncm,cmhv->nhv", inner * gates[..., None], members)
    return out.to(q.dtype)


def sp_landmark_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
                          scale: float | None = None, placement: SPPlacement | None = None) -> torch.Tensor:
    """Landmark attention over the whole sharded sequence; returns this rank's output `[B, T_local, H, V]`.

    q `[B, T_local, H, D]`, k `[B, T_local, Hkv, D]`, v `[B, T_local, Hkv, V]` (Hkv divides H; query head h
    reads kv head h // (H / Hkv)); block_size as in the op (the data pipeline inserted the landmark tokens
    before sharding); documents come from the placement. Equal (outputs and gradients) to
    `landmark_attention` on the full sequence with its `cu_seqlens`. Collective over the SP group.
    """
    name = "sp_landmark_attention"
    if not isinstance(placement, SPPlacement):
        raise ValueError(f"{name}: placement must be an SPPlacement (from shard_batch), got {type(placement)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"{name}: block_size must be an int >= 2, got {block_size!r}")
    if q.dim() != 4 or k.dim() != 4 or k.shape[:3] != v.shape[:3] or k.shape[:2] != q.shape[:2] \
            or q.shape[2] % k.shape[2]:
        raise ValueError(f"{name}: need q [B, T_local, H, D], k [B, T_local, Hkv, D], v [B, T_local, Hkv, V] "
                         f"with Hkv dividing H, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != (placement.position_ids.shape[0], placement.local_len):
        raise ValueError(f"{name}: tensors hold [B, T_local] = {tuple(q.shape[:2])} tokens but the placement has "
                         f"{tuple(placement.position_ids.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    group = q.shape[2] // k.shape[2]
    full = _GatherRow.apply(torch.cat([k, v], dim=-1), placement)
    full_k, full_v = (x.repeat_interleave(group, dim=2) for x in full.split([k.shape[-1], v.shape[-1]], dim=-1))
    host = placement.host_view()                          # piece boundaries from host values
    starts = _document_starts(host.doc_ids).tolist()
    c = placement.chunk_size
    rows = []
    for b, pieces in enumerate(_document_pieces(host)):
        outs = []
        for local, lo, hi in pieces:
            first = placement.chunk_ids[local] * c + lo                     # global index of the piece start
            doc_start = starts[b][first]
            outs.append(_piece(q[b, local * c + lo:local * c + hi], full_k[b, doc_start:first + hi - lo],
                               full_v[b, doc_start:first + hi - lo], first - doc_start, block_size, scale))
        rows.append(torch.cat(outs))
    return torch.stack(rows)
