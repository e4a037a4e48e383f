"""Shape helpers shared by the reference and chunked PyTorch implementations of `linear_attention`."""
from __future__ import annotations

import torch


def per_token_log_decay(log_decay: torch.Tensor | None, batch: int, length: int, heads: int) -> torch.Tensor | None:
    """Broadcast a per-head `[H]` or per-token `[B, T, H]` log-decay to `[B, T, H]` (None stays None).

    A per-head decay is expanded as a view, so autograd sums the per-token gradients back into `[H]`.
    """
    if log_decay is None or log_decay.dim() == 3:
        return log_decay
    return log_decay.view(1, 1, heads).expand(batch, length, heads)


def document_spans(cu_seqlens: torch.Tensor | None, batch: int, length: int) -> list[tuple[int, int, int]]:
    """List `(batch_row, start, end)` for every sequence, in state order `n = 0 .. N-1`.

    Without `cu_seqlens` each batch row is one sequence `[0, T)`; with it (B == 1) each document is
    `[cu_seqlens[n], cu_seqlens[n+1])` of row 0.
    """
    if cu_seqlens is None:
        return [(row, 0, length) for row in range(batch)]
    offsets = cu_seqlens.tolist()
    return [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """States are fp32, except that float64 inputs keep float64 states (exact reference comparisons)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
