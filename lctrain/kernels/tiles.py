"""Tile tables of packed documents for the Triton kernels that launch one program per tile of one document.

A grid over `cdiv(longest document, tile) x documents` would put documents on a limited grid axis (CUDA allows
65,535 on axes 1 and 2) and launch idle programs for every short document. Instead axis 0 (up to 2^31 - 1)
enumerates the tiles that exist: row r of the table says which document program r works on and which of its
tiles. Built on the host from the batch's host offsets, copied to the device once per launch.
"""
from __future__ import annotations

import torch


def tile_counts(lengths: torch.Tensor, tile: int, repeat: int = 1) -> torch.Tensor:
    """Tiles per document: `cdiv(length, tile) * repeat` (int64, one per document)."""
    return (lengths.long() + tile - 1) // tile * repeat


def tile_table(cu_seqlens_cpu: torch.Tensor, tile: int, repeat: int = 1) -> torch.Tensor:
    """int32 `[NT, 2]` on the host: (document, tile number within it) for `tile_counts(lengths, tile, repeat)`
    tiles of each document, documents in order. `repeat` > 1 numbers several sub-tiles per tile (a landmark
    block split into query tiles)."""
    lengths = cu_seqlens_cpu[1:].long() - cu_seqlens_cpu[:-1].long()
    counts = tile_counts(lengths, tile, repeat)
    docs = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(docs.numel()) - first[docs]
    return torch.stack([docs, local], dim=1).to(torch.int32).contiguous()
