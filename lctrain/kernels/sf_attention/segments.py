"""Segmentation plans for grouped attention: which tokens go into which packed segment, and back.

A plan turns `B * T` flattened tokens into a packed stream of `P` rows cut into segments. Each segment holds,
in order,

* its prefix: the sink tokens `[doc_start, min(doc_start + sink, first_member))` of its document that come
  before the segment (only when `sink > 0`), then
* its members: the tokens sharing one (row, group, document), in the order in use (original order, or each
  row rolled left by `group_size // 2` when `wrap=True`).

Full causal attention inside every packed segment is then exactly grouped attention with global sink tokens;
`reassemble` reads each token's output back from the row where it sits as a member (prefix rows are copies
used only as keys/values). Everything is built with vectorised torch ops, without a loop over tokens or
segments; the plan is O(P) memory with P <= B * T * (1 + sink / group_size) roughly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SegmentPlan:
    """A packed segment stream over `B * T` flattened tokens.

    gather_index: long `[P]`, the flattened token index (`b * T + t`) copied into each packed row.
    cu_seqlens:   int32 `[num_segments + 1]`, segment offsets over the `P` packed rows.
    query_rows:   long `[B * T]`, the packed row where each token is a member of its segment (not a prefix).
    max_segment:  length of the longest packed segment (prefix included); 0 for an empty input.
    """
    gather_index: torch.Tensor
    cu_seqlens: torch.Tensor
    query_rows: torch.Tensor
    max_segment: int

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def packed_length(self) -> int:
        return self.gather_index.numel()


def segment(x: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """`[B * T, ...]` -> packed `[P, ...]` (differentiable gather)."""
    return x.index_select(0, plan.gather_index)


def reassemble(y: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """Packed `[P, ...]` -> `[B * T, ...]` in the original token order, taking each token's member row."""
    return y.index_select(0, plan.query_rows)


def segment_plan(
    batch: int,
    length: int,
    group_size: int,
    cu_seqlens: torch.Tensor | None = None,
    shifted: bool = False,
    sink: int = 0,
    wrap: bool = False,
    device: torch.device | str | None = None,
) -> SegmentPlan:
    """Build the plan for one half of the heads.

    Args:
        batch, length: B and T; tokens are flattened as `b * T + t`.
        group_size: G >= 1. Unshifted: token t of a row is in group `t // G`.
        cu_seqlens: int `[N+1]` document offsets over the flattened `B * T` tokens, or None (one document
            per row). Row starts always start a document, listed or not.
        shifted: shift the groups by `s = G // 2`. Without `wrap` the group of t is `(t + s) // G` (the
            first group is `[0, G - s)`, no wrap-around).
        sink: the first `sink` tokens of each document prefix every later segment of that document.
        wrap: LongLoRA's roll: rolled position r of a row holds token `(r + s) mod T` (s = 0 when not
            shifted), groups are `r // G` and members are listed in rolled order. Needs `sink == 0`.
        device: where the plan lives (default: cu_seqlens' device, else CPU).
    """
    if group_size < 1 or sink < 0 or batch < 0 or length < 0:
        raise ValueError(f"segment_plan: need group_size >= 1, sink >= 0 and B, T >= 0, got group_size="
                         f"{group_size}, sink={sink}, B={batch}, T={length}")
    if wrap and sink:
        raise ValueError(f"segment_plan: sink={sink} is not supported with wrap=True (use sink=0)")
    if device is None:
        device = cu_seqlens.device if cu_seqlens is not None else torch.device("cpu")
    device = torch.device(device)
    n = batch * length
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return SegmentPlan(empty, torch.zeros(1, dtype=torch.int32, device=device), empty, 0)

    shift = group_size // 2 if shifted else 0
    flat = torch.arange(n, device=device)
    row = flat // length
    pos = flat - row * length
    row_start = row * length
    if cu_seqlens is None:
        start = row_start
    else:
        offsets = cu_seqlens.to(device=device, dtype=torch.long)
        # The last offset <= f (right=True skips repeated offsets of empty documents); a row start also cuts.
        start = torch.maximum(offsets[torch.searchsorted(offsets, flat, right=True) - 1], row_start)
    unit = torch.cumsum((start == flat).long(), 0) - 1  # id of each token's (row, document) piece

    if wrap:
        # Walk each row in rolled order: `pos` plays the rolled position r.
        token = row_start + (pos + shift) % length
        group = pos // group_size
    else:
        token = flat
        group = (pos + shift) // group_size
    groups_per_row = (length + shift) // group_size + 1
    key = unit[token] * groups_per_row + group
    if wrap:
        # A row that fits in one rolled group can hold one document in two runs (rolled start and end);
        # a stable sort puts them together while keeping rolled order. Without wrap keys never decrease.
        key, perm = torch.sort(key, stable=True)
        token = token[perm]
    order = token  # member tokens, segment by segment

    is_first = torch.ones(n, dtype=torch.bool, device=device)
    is_first[1:] = key[1:] != key[:-1]
    seg = torch.cumsum(is_first.long(), 0) - 1  # segment of each member position
    member_start = is_first.nonzero().squeeze(1)  # [S] first member position of each segment
    counts = torch.diff(member_start, append=member_start.new_tensor([n]))
    first_token = order[member_start]
    doc_start = start[first_token]
    if sink:
        prefix = (first_token - doc_start).clamp(max=sink)
    else:
        prefix = torch.zeros_like(counts)
    seg_len = prefix + counts
    cu = torch.zeros(seg_len.numel() + 1, dtype=torch.long, device=device)
    cu[1:] = torch.cumsum(seg_len, 0)
    packed = n + int(prefix.sum())

    seg_of_row = torch.repeat_interleave(torch.arange(seg_len.numel(), device=device), seg_len,
                                         output_size=packed)
    offset = torch.arange(packed, device=device) - cu[seg_of_row]
    row_prefix = prefix[seg_of_row]
    member_pos = (member_start[seg_of_row] + offset - row_prefix).clamp(0, n - 1)
    gather_index = torch.where(offset < row_prefix, doc_start[seg_of_row] + offset, order[member_pos])

    rows_of_members = cu[seg] + prefix[seg] + (torch.arange(n, device=device) - member_start[seg])
    query_rows = torch.empty(n, dtype=torch.long, device=device)
    query_rows[order] = rows_of_members
    return SegmentPlan(gather_index, cu.to(torch.int32), query_rows, int(seg_len.max()))
