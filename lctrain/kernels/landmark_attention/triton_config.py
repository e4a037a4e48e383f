"""Tile sizes of the `landmark_attention` Triton kernels, as a pure function of the head dims and the block size
(no autotuning).

Every kernel holds one whole landmark block of keys in a tile (`block_n` = the block size rounded up to a power
of two), so a block's intra-block log-sum-exp comes out of one tile and the backward pass can recompute it
without a second sweep. That bounds the block size: `MAX_BLOCK_SIZE`. A launch uses exactly
`launch_config(D, Dv, block_size, kernel)`, so the ahead-of-time compile check (`aot_specs` in
`triton_blocks.py`) enumerates every configuration a launch can use.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton

MAX_HEAD_DIM = 128
MAX_BLOCK_SIZE = 64
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # padded width of q/k and v; narrower heads are padded up to 16
BLOCK_TILES = (16, 32, 64)  # padded block sizes (key tile rows)
KERNELS = ("fwd", "bwd_dq", "bwd_dkv")


@dataclass(frozen=True)
class LaunchConfig:
    """block_m: queries per tile (BM, divides block_n). block_n: key tile rows (BN), one whole landmark block.
    block_d / block_dv: padded widths of the q/k and v heads (equal: one padded width per launch)."""

    block_m: int
    block_n: int
    block_d: int
    block_dv: int
    num_warps: int
    num_stages: int


def padded_dim(dim: int) -> int:
    """Head dim (or block size) rounded up to a power of two >= 16 (the smallest `tl.dot` operand)."""
    return max(16, triton.next_power_of_2(dim))


def launch_config(head_dim: int, value_dim: int, block_size: int, kernel: str) -> LaunchConfig:
    """Configuration of `kernel` (one of `KERNELS`) for head dims D, Dv (<= MAX_HEAD_DIM) and `block_size`
    (2 .. MAX_BLOCK_SIZE).

    Sizes chosen so every configuration compiles for sm_80 and sm_90 in bf16 and fp32 without register spills
    (checked by `python -m lctrain.kernels.aot`): query tiles of at most 32 rows; 16 where a whole block of
    keys and values plus the query-side tiles would not fit the registers (128-wide heads in the forward and dq
    kernels, whose q and dO operands every warp holds in full; 64-wide heads with 64-token blocks in the dq
    kernel); 8 warps for heads of 64 or more; and the few exceptions in `_SPILL_FREE`.
    """
    for name, dim in (("D", head_dim), ("Dv", value_dim)):
        if dim < 1 or dim > MAX_HEAD_DIM:
            raise ValueError(f"landmark_attention: head dim {name}={dim} is not supported by the Triton kernels "
                             f"(1 <= {name} <= {MAX_HEAD_DIM})")
    if block_size < 2 or block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"landmark_attention: block_size={block_size} is not supported by the Triton kernels "
                         f"(2 <= block_size <= {MAX_BLOCK_SIZE})")
    if kernel not in KERNELS:
        raise ValueError(f"landmark_attention: kernel={kernel!r} is not one of {KERNELS}")
    width = padded_dim(max(head_dim, value_dim))
    block_n = padded_dim(block_size)
    warps = 8 if width >= 64 else 4
    block_m = min(block_n, 32)
    if (width >= 128 and kernel != "bwd_dkv") or (width >= 64 and block_n >= 64 and kernel == "bwd_dq"):
        block_m = 16
    block_m, warps = _SPILL_FREE.get((kernel, block_n, width), (block_m, warps))
    return LaunchConfig(block_m, block_n, width, width, num_warps=warps, num_stages=1)


# (kernel, block_n, width) -> (block_m, num_warps) where the rule above spills on one target: ptxas, aiming at
# a register count that fits more blocks per SM, spills a few bytes there. Found by the ahead-of-time sweep;
# each replacement compiles spill-free for sm_80 and sm_90 in bf16 and fp32.
_SPILL_FREE = {
    ("bwd_dq", 32, 32): (16, 4),
    ("bwd_dkv", 32, 32): (32, 8),
    ("bwd_dkv", 16, 64): (16, 4),
    ("bwd_dq", 16, 128): (16, 4),  # with 8 warps ptxas caps it at 128 registers and spills (bf16, sm_90)
}
