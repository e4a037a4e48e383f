"""Sliding-window attention with sinks (the attention op's window form) over a sequence split across SP ranks.

A query at global index i of document d sees key j iff j <= i, j is in d, and (i - j < window or j is one of the
first `sink` tokens of d). For the queries of one local chunk starting at global index s, the keys outside the
chunk are

* the halo: the `window - 1` tokens before s that belong to the chunk's first document, and
* the sinks: the first `sink` tokens of that same document that lie before the halo
  (every other document of the chunk starts inside it, so its sinks are local).

Both are fetched point-to-point from whichever ranks hold them (any number of ranks back: the window may be
longer than a chunk). Every rank derives the same fetch plan from the placement's host document ids, so sender and
receiver agree on what moves without exchanging metadata or reading the device. Each document piece of a local
chunk then becomes one packed stream for the op: `[sinks | halo | piece]` for the piece that continues a document, `[piece]` for the others
(optionally after a per-document prefix such as Titans' persistent tokens). A stream equals the document's true
beginning except for a gap between sinks and halo that the window never crosses, so the op's own rule (window
counted along the stream, sinks from the stream start) reproduces the full-sequence result exactly. Backward
sends the fetched keys' and values' gradients back to their owners. Traffic is counted as `attn`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lctrain.parallel import comm
from lctrain.parallel.sharding import SPPlacement

KIND = "attn"


# ------------------------------------------------------------------------------------------------ fetch plan
def _document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """long `[B, T]`: global index of the first token of each token's document."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.cummax(torch.where(is_start, index, torch.zeros_like(index)), dim=1).values


def _requests(placement: SPPlacement, rank: int, halo: int, sink: int, starts: torch.Tensor):
    """What SP rank `rank` needs before each of its chunks: global indices `[B, n_local, sink + halo]` (sink slots
    then halo slots, valid entries right-aligned in each block) and their validity."""
    c = placement.chunk_size
    device = starts.device
    chunk_starts = torch.tensor([j * c for j in placement.chunk_ids_of(rank)], device=device)   # [n]
    doc_start = starts[:, chunk_starts]                                                       # [B, n]
    halo_index = chunk_starts[None, :, None] - halo + torch.arange(halo, device=device)       # [1, n, halo]
    halo_valid = (halo_index >= 0) & (halo_index >= doc_start[..., None])
    # sinks before the halo: doc_start .. doc_start + count - 1, placed at the end of the sink block
    count = (chunk_starts[None, :] - halo - doc_start).clamp(min=0, max=sink)                 # [B, n]
    slot = torch.arange(sink, device=device)
    sink_index = doc_start[..., None] + slot - (sink - count[..., None])
    sink_valid = slot >= (sink - count[..., None])
    index = torch.cat([sink_index, halo_index.expand(doc_start.shape + (halo,))], dim=-1)
    valid = torch.cat([sink_valid, halo_valid.expand(doc_start.shape + (halo,))], dim=-1)
    return index, valid


@dataclass
class _FetchPlan:
    """Flat index lists: `local` copies (source token, destination slot) on this rank; `incoming[src]` slots
    filled by SP rank src; `outgoing[dst]` local tokens sent to SP rank dst (in the receiver's slot order)."""
    slots: int                      # B * n_local * need
    valid: torch.Tensor             # bool [B, n_local, need]: slot holds a real token
    local: tuple[torch.Tensor, torch.Tensor]
    incoming: dict[int, torch.Tensor]
    outgoing: dict[int, torch.Tensor]

    def to(self, device) -> "_FetchPlan":
        """The plan's index tensors on `device` (planned on the host, used where the tokens are)."""
        return _FetchPlan(self.slots, self.valid.to(device), tuple(t.to(device) for t in self.local),
                          {r: t.to(device) for r, t in self.incoming.items()},
                          {r: t.to(device) for r, t in self.outgoing.items()})


def _plan(placement: SPPlacement, halo: int, sink: int) -> _FetchPlan:
    c, me, rows = placement.chunk_size, placement.sp_rank, placement.doc_ids.shape[0]
    device = placement.doc_ids.device
    starts = _document_starts(placement.doc_ids)
    owner_rank = torch.empty(placement.num_chunks, dtype=torch.long, device=device)
    owner_local = torch.empty_like(owner_rank)
    for rank in range(placement.sp_size):
        for local, chunk in enumerate(placement.chunk_ids_of(rank)):
            owner_rank[chunk], owner_local[chunk] = rank, local
    local_len = placement.local_len

    def where(rank):
        """For SP rank `rank`'s requests: (valid, owner rank, flat source index on the owner, flat slot index)."""
        index, valid = _requests(placement, rank, halo, sink, starts)
        safe = index.clamp(min=0)
        chunk = safe // c
        row = torch.arange(rows, device=device)[:, None, None]
        source = row * local_len + owner_local[chunk] * c + safe % c
        slot = torch.arange(index.numel(), device=device).reshape(index.shape)
        return valid, owner_rank[chunk], source, slot

    valid, owner, source, slot = where(me)
    mine = valid & (owner == me)
    local = (source[mine], slot[mine])
    incoming = {}
    for src in range(placement.sp_size):
        picked = valid & (owner == src)
        if src != me and bool(picked.any()):
            incoming[src] = slot[picked]
    outgoing = {}
    for dst in range(placement.sp_size):
        if dst == me:
            continue
        dst_valid, dst_owner, dst_source, _ = where(dst)
        picked = dst_valid & (dst_owner == me)
        if bool(picked.any()):
            outgoing[dst] = dst_source[picked]
    return _FetchPlan(slots=valid.numel(), valid=valid, local=local, incoming=incoming, outgoing=outgoing)


class _Fetch(torch.autograd.Function):
    """x_local `[B, T_local, ...]` -> the planned tokens `[slots, ...]` (zeros in unused slots)."""

    @staticmethod
    def forward(ctx, x_local, plan: _FetchPlan, placement: SPPlacement):
        flat = x_local.reshape((-1,) + tuple(x_local.shape[2:]))
        out = flat.new_zeros((plan.slots,) + tuple(flat.shape[1:]))
        sends = [(flat[index], dst) for dst, index in plan.outgoing.items()]
        recvs = [(flat.new_empty((index.numel(),) + tuple(flat.shape[1:])), src)
                 for src, index in plan.incoming.items()]
        comm.exchange(sends, recvs, placement.groups, KIND)
        for (buffer, src) in recvs:
            out[plan.incoming[src]] = buffer
        source, slot = plan.local
        out[slot] = flat[source]
        ctx.plan, ctx.placement, ctx.shape = plan, placement, x_local.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        plan, placement, shape = ctx.plan, ctx.placement, ctx.shape
        grad = grad_out.new_zeros((shape[0] * shape[1],) + tuple(shape[2:]))
        # reverse direction: gradients of the slots go back to the tokens they were copied from
        sends = [(grad_out[index].contiguous(), src) for src, index in plan.incoming.items()]
        recvs = [(grad_out.new_empty((index.numel(),) + tuple(grad_out.shape[1:])), dst)
                 for dst, index in plan.outgoing.items()]
        comm.exchange(sends, recvs, placement.groups, KIND)
        for buffer, dst in recvs:
            grad.index_add_(0, plan.outgoing[dst], buffer)
        source, slot = plan.local
        grad.index_add_(0, source, grad_out[slot])
        return grad.reshape(shape), None, None


# -------------------------------------------------------------------------------------------- attention
def _document_pieces(placement: SPPlacement) -> list[list[tuple[int, int, int]]]:
    """Per row: `(local chunk, lo, hi)` of every document piece of the local chunks, in local order."""
    c = placement.chunk_size
    docs = placement.local_doc_ids().reshape(placement.doc_ids.shape[0], -1, c).tolist()
    pieces = []
    for row in docs:
        mine = []
        for local, chunk in enumerate(row):
            cuts = [0] + [t for t in range(1, c) if chunk[t] != chunk[t - 1]] + [c]
            mine += [(local, lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]
        pieces.append(mine)
    return pieces


def _streams(placement: SPPlacement, valid: torch.Tensor, prefix_len: int):
    """Index plan of the packed streams `[prefix | sinks | halo | first piece]`, `[prefix | piece]`, ...

    Rows of the source table: local tokens `[0, B*T_local)`, then fetched slots `[B*n_local*need)`, then the
    prefix `[P)`, then one zero row. Returns (key sources `[S]`, query sources `[S]`, int32 CPU offsets `[N+1]`,
    stream position of every local token `[B*T_local]`).
    """
    c, local_len = placement.chunk_size, placement.local_len
    rows, n_local, need = valid.shape
    device = valid.device
    fetched_base = rows * local_len
    prefix_base = fetched_base + rows * n_local * need
    zero_row = prefix_base + prefix_len
    prefix_rows = torch.arange(prefix_base, prefix_base + prefix_len, device=device)
    key_parts, query_parts, offsets, output = [], [], [], []
    length = 0
    for b, pieces in enumerate(_document_pieces(placement)):
        for local, lo, hi in pieces:
            before = [prefix_rows]
            if lo == 0:       # the chunk's first piece continues its document: sinks and halo go before it
                slots = torch.nonzero(valid[b, local]).flatten()
                before.append(fetched_base + (b * n_local + local) * need + slots)
            before = torch.cat(before)
            tokens = b * local_len + local * c + torch.arange(lo, hi, device=device)
            offsets.append(length)
            key_parts += [before, tokens]
            query_parts += [torch.full_like(before, zero_row), tokens]
            output.append(length + before.numel() + torch.arange(hi - lo, device=device))
            length += before.numel() + hi - lo
    offsets.append(length)
    offsets_cpu = torch.tensor(offsets, dtype=torch.int32)
    return torch.cat(key_parts), torch.cat(query_parts), offsets_cpu, torch.cat(output)


def document_offsets(placement: SPPlacement) -> torch.Tensor:
    """long `[B, T_local]`: index of each local token inside its document (a row start counts as a document
    start, as with `cu_seqlens`), e.g. for positions of per-document prefixes."""
    index = placement.global_index()
    return index[None, :] - _document_starts(placement.doc_ids)[:, index]


def sp_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | torch.Tensor,
                       sink: int | torch.Tensor = 0, scale: float | None = None,
                       placement: SPPlacement | None = None, backend: str | None = None,
                       prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                       op: Callable | None = None) -> torch.Tensor:
    """Sliding-window attention with sinks over the whole sharded sequence; returns this rank's output.

    q `[B, T_local, H, D]`, k `[B, T_local, Hkv, D]`, v `[B, T_local, Hkv, Dv]`; window / sink ints (or integer
    tensors `[H]`, per head) as in `lctrain.kernels.local_attention`; documents come from the placement (a new
    one at every position 0 and at each row start). prefix: optional `(k_p [P, Hkv, D], v_p [P, Hkv, Dv])`
    keys and values standing before every document (e.g. Titans' persistent tokens; the op then sees each
    document as `[prefix | document]` with `sink + P` sink tokens). Returns `[B, T_local, H, Dv]`, equal
    (outputs and gradients) to the op on the full sequence. The window may span any number of earlier chunks.
    Collective over the SP group (point-to-point; every rank must call it).
    """
    host_offsets = op is None
    if op is None:
        from lctrain.kernels.attention import local_attention_op  # late: kernels are optional for sharding alone
        op = local_attention_op(backend)
    # per-head spans as int tensors [H] (host values), as the ops take them
    window = torch.tensor(window) if isinstance(window, (list, tuple)) else window
    sink = torch.tensor(sink) if isinstance(sink, (list, tuple)) else sink
    name = "sp_local_attention"
    if not isinstance(placement, SPPlacement):
        raise ValueError(f"{name}: placement must be an SPPlacement (from shard_batch), got {type(placement)}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or k.shape[:2] != q.shape[:2]:
        raise ValueError(f"{name}: need q [B, T_local, H, D], k [B, T_local, Hkv, D], v [B, T_local, Hkv, Dv], "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    rows, local_len = q.shape[:2]
    if local_len != placement.local_len or rows != placement.position_ids.shape[0]:
        raise ValueError(f"{name}: tensors hold [B={rows}, T_local={local_len}] tokens but the placement has "
                         f"[B={placement.position_ids.shape[0]}, T_local={placement.local_len}]")
    if prefix is not None and (prefix[0].shape[1:] != k.shape[2:] or prefix[1].shape[1:] != v.shape[2:]
                               or prefix[0].shape[0] != prefix[1].shape[0]):
        raise ValueError(f"{name}: prefix must be (k_p [P, Hkv, D], v_p [P, Hkv, Dv]) matching k and v, got "
                         f"{tuple(prefix[0].shape)}, {tuple(prefix[1].shape)}")

    def widest(span, low, label):
        value = int(span.max()) if isinstance(span, torch.Tensor) else span
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: {label} must be an int >= {low} or an integer tensor [H], got {span!r}")
        return value
    halo = min(widest(window, 1, "window") - 1, placement.seq_len)
    sinks = min(widest(sink, 0, "sink"), placement.seq_len)
    need = halo + sinks
    n_local = len(placement.chunk_ids)
    prefix_len = 0 if prefix is None else prefix[0].shape[0]

    # plan on the host (no device read-back), then move the index tensors once to where the tokens are
    host = placement.host_view()
    plan = _plan(host, halo, sinks)
    key_source, query_source, offsets, output = _streams(host, plan.valid.reshape(rows, n_local, need), prefix_len)
    plan = plan.to(q.device)
    key_source, query_source, output = (t.to(q.device) for t in (key_source, query_source, output))
    head_dim = k.shape[-1]
    fetched = _Fetch.apply(torch.cat([k, v], dim=-1), plan, placement)     # [B * n_local * need, Hkv, D + Dv]
    fetched_k, fetched_v = fetched.split([head_dim, v.shape[-1]], dim=-1)

    def table(local, extra, prefix_part):
        parts = [local.reshape((-1,) + tuple(local.shape[2:])), extra]
        if prefix_part is not None:
            parts.append(prefix_part.to(local.dtype))
        parts.append(local.new_zeros((1,) + tuple(local.shape[2:])))
        return torch.cat(parts)
    k_stream = table(k, fetched_k, None if prefix is None else prefix[0])[key_source]
    v_stream = table(v, fetched_v, None if prefix is None else prefix[1])[key_source]
    q_stream = table(q, q.new_zeros((rows * n_local * need,) + tuple(q.shape[2:])), None
                     if prefix is None else q.new_zeros((prefix_len,) + tuple(q.shape[2:])))[query_source]
    stream_sink = sink + prefix_len if prefix_len else sink
    extra = {"cu_seqlens_cpu": offsets} if host_offsets else {}   # an op given by the caller may not take them
    o = op(q_stream[None], k_stream[None], v_stream[None], window, stream_sink, scale,
           cu_seqlens=offsets.to(q.device), backend=backend, **extra)
    return o[0, output].reshape((rows, local_len) + tuple(o.shape[2:]))
