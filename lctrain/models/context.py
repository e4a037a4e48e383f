"""Per-batch context handed to every mixer: positions, document boundaries, sequence-parallel placement, cache."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """`[B, T]` positions -> `[B, T]` long document index per row, from 0 (a document starts at position 0 and at
    the start of every row)."""
    starts = position_ids == 0
    starts[:, 0] = True
    return torch.cumsum(starts.long(), dim=1) - 1


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed-document offsets over the flattened `[B*T]` tokens: a sequence starts wherever the position is 0
    and at the start of every row. Returns int32 `[N+1]`."""
    flat = position_ids.reshape(-1)
    starts = flat == 0
    batch, seqlen = position_ids.shape
    starts = starts.clone()
    starts[torch.arange(batch, device=flat.device) * seqlen] = True
    idx = torch.nonzero(starts, as_tuple=False).flatten()
    end = torch.tensor([flat.numel()], device=flat.device, dtype=idx.dtype)
    return torch.cat([idx, end]).to(torch.int32)


@dataclass
class BatchContext:
    """What a mixer needs to know besides its input.

    position_ids: `[B, T_local]` long, position of each token inside its document (0 at a document start).
    cu_seqlens:   int32 `[N+1]` offsets of the documents over the flattened `B*T_local` tokens (document masking
                  and per-document recurrent state); None when every row is one sequence.
    sp:           sequence-parallel placement of this rank's tokens (an `lctrain.parallel` object) or None.
    cache:        per-layer decoding state for incremental generation (a dict keyed by layer index) or None.
    """
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    sp: Any = None
    cache: dict | None = None
    extras: dict = field(default_factory=dict)

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor, packed: bool = True, **kw) -> "BatchContext":
        cu = cu_seqlens_from_positions(position_ids) if packed else None
        return cls(position_ids=position_ids, cu_seqlens=cu, **kw)
