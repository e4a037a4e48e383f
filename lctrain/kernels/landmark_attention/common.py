"""Block layout shared by every implementation of `landmark_attention`.

Blocks of `block_size` tokens are counted from the start of each sequence (document). Token `block_size - 1` of
every *complete* block is that block's landmark; a trailing partial block has no landmark (nothing after it
could use one).
"""
from __future__ import annotations

import torch

from lctrain.kernels.linear_attention.common import document_spans

__all__ = ["document_spans", "landmark_mask"]


def landmark_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """Bool `[length]`: True at the landmark tokens of a sequence of `length` tokens."""
    index = torch.arange(length, device=device)
    complete = (index // block_size) < (length // block_size)
    return (index % block_size == block_size - 1) & complete
