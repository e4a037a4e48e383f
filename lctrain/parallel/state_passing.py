"""Sequential state passing (LASP-1 style) for recurrences with no cheap closed-form summary, e.g. Titans memory.

The recurrence is a step function `step(x [1, L, D], state) -> (out [1, L, ...], final_state)` that reads raw
inputs and updates a state in chunks of `chunk_size` tokens counted from the start of the stream it is given (the
surprise of a token is measured against the memory entering its chunk). Each document is streamed as
`[prefix | document]` (`prefix`: tokens prepended to every document, e.g. persistent memory tokens).

Global chunks are processed in order 0, 1, ...; the owner of chunk j hands the owner of chunk j+1, for every row
whose document crosses the boundary, the state at the *last memory-chunk boundary* before it plus the raw inputs
after that boundary (the tail, fewer than `chunk_size` tokens). The receiver runs the step on `[tail | its tokens]`
from that state, so memory chunks keep their single-process boundaries wherever the shard boundaries fall, and the
result is exact. Both sides derive tail lengths from `placement.doc_ids`, so a handoff is one point-to-point
message. Backward replays the chunks in reverse, sending the gradient of each handoff back to its sender.

The chain is sequential across ranks (no overlap between ranks); it suits layers whose state has no affine
summary. Traffic is counted under the caller's `kind`.
"""
from __future__ import annotations

from typing import Callable

import torch

from lctrain.parallel import comm
from lctrain.parallel.sharding import SPPlacement


def _leaves(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for part in state for t in _leaves(part)]


def _rebuild(template, flat: list[torch.Tensor]):
    if isinstance(template, torch.Tensor):
        return flat.pop(0)
    return type(template)(_rebuild(part, flat) for part in template)


def _pack(pieces: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([p.reshape(-1).to(dtype) for p in pieces])


def _unpack(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset:offset + t.numel()].reshape(t.shape).to(t.dtype))
        offset += t.numel()
    return out


class _Layout:
    """Document structure of the whole row, identical on every SP rank."""

    def __init__(self, placement: SPPlacement, chunk_size: int, prefix_len: int):
        self.placement, self.chunk_size, self.prefix_len = placement, chunk_size, prefix_len
        doc_ids = placement.doc_ids
        index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
        is_start = torch.ones_like(doc_ids, dtype=torch.bool)
        is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        self.doc_start = torch.cummax(torch.where(is_start, index, torch.zeros_like(index)), dim=1).values.tolist()
        self.doc_ids = doc_ids.tolist()
        self.owner = {}
        for rank in range(placement.sp_size):
            for local, chunk in enumerate(placement.chunk_ids_of(rank)):
                self.owner[chunk] = (rank, local)

    def crossing(self, boundary_chunk: int) -> list[int]:
        """Rows whose document continues from global chunk `boundary_chunk` into the next one."""
        start = (boundary_chunk + 1) * self.placement.chunk_size
        return [b for b, docs in enumerate(self.doc_ids) if docs[start] == docs[start - 1]]

    def tail_len(self, row: int, boundary_chunk: int) -> int:
        """Stream tokens (prefix included) of the crossing document after its last memory-chunk boundary."""
        start = (boundary_chunk + 1) * self.placement.chunk_size
        return (start - self.doc_start[row][start] + self.prefix_len) % self.chunk_size

    def segments(self, row: int, chunk: int) -> list[tuple[int, int]]:
        """`(lo, hi)` within the chunk of each document piece, in order."""
        c = self.placement.chunk_size
        docs = self.doc_ids[row][chunk * c:(chunk + 1) * c]
        cuts = [0] + [t for t in range(1, c) if docs[t] != docs[t - 1]] + [c]
        return list(zip(cuts[:-1], cuts[1:]))


class _StatePassing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, anchor, step, initial_state, prefix, layout: _Layout, kind: str, track: bool):
        placement = layout.placement
        me, c, cs = placement.sp_rank, placement.chunk_size, layout.chunk_size
        rows = x_local.shape[0]
        structure = initial_state(x_local[:1, :0])
        template = _leaves(structure)
        wire_dtype = torch.promote_types(template[0].dtype, x_local.dtype)
        x_leaf = x_local.detach().requires_grad_(track)
        chunks = {}            # local chunk index -> (output [B, c, ...], outgoing message tensors, incoming leaves)
        arrived = {}           # row -> [state leaves..., tail] entering the chunk being processed
        with torch.set_grad_enabled(track):
            for j in range(placement.num_chunks):
                owner, local = layout.owner[j]
                outgoing, outputs = {}, []
                if owner == me:
                    crossing_next = set(layout.crossing(j)) if j + 1 < placement.num_chunks else set()
                    for b in range(rows):
                        pieces = []
                        segments = layout.segments(b, j)
                        for n, (lo, hi) in enumerate(segments):
                            tokens = x_leaf[b:b + 1, local * c + lo:local * c + hi]
                            if n == 0 and b in arrived:
                                state, head = _rebuild(structure, list(arrived[b][:-1])), arrived[b][-1]
                            else:
                                state, head = initial_state(tokens), prefix(tokens)
                            stream = torch.cat([head, tokens], dim=1)
                            if n == len(segments) - 1 and b in crossing_next:
                                # stop at the last memory-chunk boundary; the tail after it travels on raw
                                cut = stream.shape[1] - layout.tail_len(b, j)
                                outs = []
                                if cut > 0:
                                    out, state = step(stream[:, :cut], state)
                                    outs.append(out)
                                if cut < stream.shape[1]:
                                    outs.append(step(stream[:, cut:], state)[0])
                                out = torch.cat(outs, dim=1)
                                outgoing[b] = _leaves(state) + [stream[:, cut:]]
                            else:
                                out, _ = step(stream, state)
                            pieces.append(out[:, head.shape[1]:])
                        outputs.append(torch.cat(pieces, dim=1))
                    chunks[local] = (torch.cat(outputs, dim=0), outgoing, dict(arrived))
                arrived = {}
                if j + 1 < placement.num_chunks:
                    arrived = _handoff(layout, j, outgoing, template, wire_dtype, x_local, kind, track)
        ctx.layout, ctx.kind, ctx.chunks, ctx.x_leaf = layout, kind, chunks, x_leaf
        ctx.template, ctx.wire_dtype = template, wire_dtype
        n_local = len(placement.chunk_ids)
        out = torch.cat([chunks[local][0] for local in range(n_local)], dim=1)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        layout, chunks, x_leaf = ctx.layout, ctx.chunks, ctx.x_leaf
        placement = layout.placement
        me, c = placement.sp_rank, placement.chunk_size
        returned = {}                      # row -> grads of the outgoing message of the chunk being replayed
        for j in range(placement.num_chunks - 1, -1, -1):
            owner, local = layout.owner[j]
            back = {}
            if owner == me:
                out, outgoing, incoming = chunks[local]
                # this chunk's outputs and the messages it handed on, with the gradients that came back for them
                pairs = [(out, grad_out[:, local * c:(local + 1) * c])]
                for b, message in outgoing.items():
                    pairs += [(t, g.to(t.dtype)) for t, g in zip(message, returned[b])]
                pairs = [(t, g) for t, g in pairs if t.requires_grad]
                if pairs:
                    torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
                for b, pieces in incoming.items():
                    back[b] = [p.grad if p.grad is not None else torch.zeros_like(p) for p in pieces]
            returned = {}
            if j > 0:
                returned = _handoff_back(layout, j - 1, back, ctx.template, ctx.wire_dtype, x_leaf, ctx.kind)
        grad_x = x_leaf.grad if x_leaf.grad is not None else torch.zeros_like(x_leaf)
        ctx.chunks = ctx.x_leaf = None          # release the per-chunk graphs
        return grad_x, None, None, None, None, None, None, None


def _message_like(layout, j, rows, template, x_local):
    """Per crossing row: tensors shaped like the message of boundary j (state leaves, then the tail)."""
    return {b: [t for t in template] + [x_local.new_empty((1, layout.tail_len(b, j)) + tuple(x_local.shape[2:]))]
            for b in rows}


def _handoff(layout, j, outgoing, template, wire_dtype, x_local, kind, track):
    """Move boundary j's messages from the owner of chunk j to the owner of chunk j+1; return the receiver's
    incoming `{row: [state leaves..., tail]}` as fresh leaves (empty elsewhere)."""
    placement = layout.placement
    me = placement.sp_rank
    src, dst = layout.owner[j][0], layout.owner[j + 1][0]
    rows = layout.crossing(j)
    if not rows or me not in (src, dst):
        return {}
    like = _message_like(layout, j, rows, template, x_local)
    if src == dst:
        received = {b: [t.detach() for t in outgoing[b]] for b in rows}
    else:
        sizes = [sum(t.numel() for t in like[b]) for b in rows]
        if me == src:
            flat = torch.cat([_pack(outgoing[b], wire_dtype) for b in rows]).detach()
            comm.exchange([(flat, dst)], [], placement.groups, kind)
            return {}
        flat = torch.empty(sum(sizes), dtype=wire_dtype, device=x_local.device)
        comm.exchange([], [(flat, src)], placement.groups, kind)
        received = {b: _unpack(piece, like[b]) for b, piece in zip(rows, flat.split(sizes))}
    return {b: [t.clone().requires_grad_(track) for t in received[b]] for b in rows}


def _handoff_back(layout, j, back, template, wire_dtype, x_like, kind):
    """Send the gradients of boundary j's messages from the owner of chunk j+1 back to the owner of chunk j."""
    placement = layout.placement
    me = placement.sp_rank
    src, dst = layout.owner[j][0], layout.owner[j + 1][0]
    rows = layout.crossing(j)
    if not rows or me not in (src, dst):
        return {}
    like = _message_like(layout, j, rows, template, x_like)
    if src == dst:
        return {b: back[b] for b in rows}
    sizes = [sum(t.numel() for t in like[b]) for b in rows]
    if me == dst:
        flat = torch.cat([_pack(back[b], wire_dtype) for b in rows])
        comm.exchange([(flat, src)], [], placement.groups, kind)
        return {}
    flat = torch.empty(sum(sizes), dtype=wire_dtype, device=x_like.device)
    comm.exchange([], [(flat, dst)], placement.groups, kind)
    return {b: _unpack(piece, like[b]) for b, piece in zip(rows, flat.split(sizes))}


def sp_state_passing(step: Callable, x: torch.Tensor, placement: SPPlacement, chunk_size: int,
                     initial_state: Callable, prefix: torch.Tensor | None = None, kind: str = "memory"):
    """Run a chunked recurrence over the whole sharded sequence, one document at a time, passing its state
    from rank to rank; returns this rank's outputs `[B, T_local, ...]`.

    step: `step(x [1, L, D], state) -> (out [1, L, ...], final_state)`, memory chunks of `chunk_size` counted
        from the start of x (e.g. a Titans layer's memory); state is a tensor or nested tuples of tensors.
    x: `[B, T_local, D]` this rank's raw inputs.
    initial_state: `initial_state(like [1, 0, D])` -> the state a document starts from (may use parameters).
    prefix: `[P, D]` inputs prepended to every document (e.g. persistent tokens) or None.
    Exact w.r.t. running `step` on `[prefix | document]` for every whole document, gradients included (also
    those of parameters used inside `step`, `initial_state` and `prefix`, accumulated during backward).
    Collective over the SP group, point-to-point and sequential: every rank must call it.
    """
    if not isinstance(placement, SPPlacement):
        raise ValueError(f"sp_state_passing: placement must be an SPPlacement, got {type(placement)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"sp_state_passing: chunk_size must be a positive int, got {chunk_size!r}")
    if x.dim() < 3 or x.shape[:2] != (placement.position_ids.shape[0], placement.local_len):
        raise ValueError(f"sp_state_passing: expected x [B={placement.position_ids.shape[0]}, "
                         f"T_local={placement.local_len}, D], got {tuple(x.shape)}")
    prefix_len = 0 if prefix is None else prefix.shape[0]

    def head(tokens):
        if prefix is None:
            return tokens[:, :0]
        return prefix.to(tokens.dtype).expand((1,) + tuple(prefix.shape))

    track = torch.is_grad_enabled()
    # a tensor that requires grad, so that backward reaches the parameters even when x needs no gradient
    anchor = torch.zeros((), device=x.device, requires_grad=track)
    layout = _Layout(placement, chunk_size, prefix_len)
    return _StatePassing.apply(x, anchor, step, initial_state, head, layout, kind, track)
