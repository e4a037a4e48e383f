"""64-bit addressing of long documents at 32-bit register cost, shared by the Triton kernels.

A token's offset is `token * row_stride`, which passes 2^31 elements in one document of 2^31 / (H * D) tokens
(524,288 at H = 16, D = 256). Widening every per-element offset to 64 bits costs registers in the tiles, and
moving a 64-bit base pointer to the tile's first token makes the tile's own offsets loop-invariant, which the
compiler then hoists into registers for the whole loop (spills at the launched configurations). So a tile's
first token is split: a 64-bit multiple of ROW_SPAN tokens moves the base pointer, and the small remainder
(< ROW_SPAN, still varying with the loop) goes into the 32-bit tile offsets, exactly as the 32-bit code did.
"""
from __future__ import annotations

import triton
import triton.language as tl

ROW_SPAN = 1024  # tokens; must equal the literal in `split_row`
MAX_TILE_ROWS = 128  # no kernel using `split_row` loads a tile of more token rows


@triton.jit
def split_row(row):
    """`(high, low)` with `row == high + low`: high an int64 multiple of ROW_SPAN (for the base pointer), low an
    int32 in [0, ROW_SPAN) for the tile offsets (`(low + arange)[:, None] * stride` stays below 2^31)."""
    low = row % 1024
    return tl.cast(row - low, tl.int64), low


def max_row_stride() -> int:
    """Largest row stride (elements per token) whose in-tile offsets fit 32 bits."""
    return (2**31 - 1) // (ROW_SPAN + MAX_TILE_ROWS)


def check_row_stride(op: str, stride: int) -> None:
    """One-line ValueError when a token row is too wide for the 32-bit in-tile offsets."""
    if stride > max_row_stride():
        raise ValueError(f"{op}: backend='triton' handles at most {max_row_stride():,} elements per token (heads x "
                         f"head dim), got {stride:,}")
