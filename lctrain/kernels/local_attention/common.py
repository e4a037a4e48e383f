"""Span and document helpers shared by the reference and blocked PyTorch paths of `local_attention`."""
from __future__ import annotations

import torch


def per_head_spans(window: int | torch.Tensor, sink: int | torch.Tensor, heads: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast `window` and `sink` (ints or int tensors `[H]`, already validated) to int64 tensors `[H]`."""
    def expand(span):
        if isinstance(span, torch.Tensor):
            return span.to(device=device, dtype=torch.long)
        return torch.full((heads,), int(span), dtype=torch.long, device=device)

    return expand(window), expand(sink)


def document_starts(cu_seqlens: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Index (within its row) of the first token of each token's document: long `[B, T]`.

    Without `cu_seqlens` every row is one document starting at 0; with it (B == 1) token t belongs to the
    document n with `cu_seqlens[n] <= t < cu_seqlens[n+1]`.
    """
    if cu_seqlens is None:
        return torch.zeros(batch, length, dtype=torch.long, device=device)
    offsets = cu_seqlens.to(device=device, dtype=torch.long)
    tokens = torch.arange(length, device=device)
    # The last offset <= t; empty documents repeat an offset, and `right=True` skips past them.
    doc = torch.searchsorted(offsets, tokens, right=True) - 1
    return offsets[doc].view(1, length)
