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
    docs:         the same boundaries as host values (`lctrain.models.documents.Documents`): document count,
                  lengths, CPU offsets for the kernels, whether every row is one document. Shapes and paths are
                  decided from these, never by reading device tensors back. None when `cu_seqlens` is None.
    document_ids: long `[B, T_local]` document index per row on the device, built once per batch (None without
                  docs).
    """
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    sp: Any = None
    cache: dict | None = None
    extras: dict = field(default_factory=dict)
    docs: Any = None
    document_ids: torch.Tensor | None = None

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor, packed: bool = True, host_positions: torch.Tensor | None = None,
                       **kw) -> "BatchContext":
        """Context for `position_ids` (on the model's device). The boundaries are computed on the host from
        `host_positions` (the loader's CPU copy of the same values) when given — no device-to-host read — and
        otherwise from one copy of `position_ids` (evaluation and tests)."""
        if not packed:
            return cls(position_ids=position_ids, **kw)
        from lctrain.models.documents import Documents
        docs = Documents.from_positions(host_positions if host_positions is not None else position_ids)
        device = position_ids.device
        return cls(position_ids=position_ids, cu_seqlens=docs.cu_seqlens(device), docs=docs,
                   document_ids=docs.document_ids(device), **kw)
