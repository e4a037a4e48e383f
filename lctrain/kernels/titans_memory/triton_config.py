"""Block sizes of the `titans_linear_memory` Triton kernels as a pure function of (K, V, chunk_size, dtype).

No autotuning: a launch uses exactly `launch_config(...)`, so `aot_specs` in `triton_chunk.py` lists every
configuration and the ahead-of-time check compiles each for real GPUs on a machine without one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

MAX_KEY_DIM = 128  # the sequential kernels hold the whole key dim of M and S (padded) in registers
# The chunk is one tile of BT >= chunk_size rows and its C x C fp32 mixing tiles live in registers: BT = 64
# spilled in every per-chunk kernel on sm_90, so chunks are at most 32 tokens.
MAX_CHUNK = 32
SUPPORTED_KEY_DIMS = (16, 32, 64, 128)
SUPPORTED_VALUE_DIMS = (16, 32, 64, 128)
CHUNK_TILES = (16, 32)  # BT: chunk_size rounded up to a power of two, at least 16 (tl.dot's minimum)
DTYPES = ("bf16", "fp16", "fp32")
TORCH_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class LaunchConfig:
    """One launch configuration.

    chunk_tile: BT, rows of the chunk tile (>= chunk_size; rows past the chunk are masked).
    key_block: BK of the sequential kernels (forward, backward state walk): all of K padded.
    value_block: BV; V is split over programs (the recurrence is independent per value column).
    inner_key_block: BK of the per-chunk kernels (output, gradients), which loop over K.
    precision, num_warps: `tl.dot` input precision and warps of the sequential kernels.
    chunk_precision, chunk_warps: the same for the per-chunk kernels.
    num_stages: pipelining stages of every kernel.
    """

    chunk_tile: int
    key_block: int
    value_block: int
    inner_key_block: int
    precision: str
    num_warps: int
    chunk_precision: str
    chunk_warps: int
    # Passed at launch and compiled by the ahead-of-time check: Triton's default (3) spilled the backward
    # kernels (24-48 bytes of stack on sm_90); one stage is spill-free.
    num_stages: int = 1


def chunk_tile(chunk_size: int) -> int:
    return max(16, triton.next_power_of_2(chunk_size))


def launch_config(key_dim: int, value_dim: int, chunk_size: int, dtype: str) -> LaunchConfig:
    """Configuration for head dims K (1..128), V (>= 1), `chunk_size` (1..32) and q/k/v element type `dtype`.

    Sizes were chosen with the ahead-of-time check (`python -m lctrain.kernels.aot`): every configuration
    compiles for sm_80 and sm_90 without register spills.
    """
    if not 1 <= key_dim <= MAX_KEY_DIM:
        raise ValueError(f"titans_linear_memory: key dim K={key_dim} is not supported by the Triton kernels "
                         f"(1 <= K <= {MAX_KEY_DIM})")
    if value_dim < 1:
        raise ValueError(f"titans_linear_memory: value dim V={value_dim} must be >= 1")
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"titans_linear_memory: chunk_size={chunk_size} is not supported by the Triton kernels "
                         f"(1 <= chunk_size <= {MAX_CHUNK})")
    if dtype not in DTYPES:
        raise ValueError(f"titans_linear_memory: dtype={dtype!r} is not one of {DTYPES}")
    tile = chunk_tile(chunk_size)
    padded_k = max(16, triton.next_power_of_2(key_dim))
    padded_v = max(16, triton.next_power_of_2(value_dim))
    # The sequential kernels keep M and S ([K, BV] fp32 each) plus the chunk's K-wide q and k tiles live.
    wide = padded_k * tile >= 128 * 32
    return LaunchConfig(
        chunk_tile=tile,
        key_block=padded_k,
        value_block=min(padded_v, 16 if wide else 32),
        inner_key_block=min(padded_k, 32),
        # The sequential kernels contract all of K: tf32 tensor-core dots (IEEE fp32 dots over K = 128 spill).
        # The per-chunk kernels loop over K in blocks of 32: IEEE dots fit there (tf32 ones spilled), which
        # also keeps the C x C decay products exact. The interpreter computes every dot in full fp32.
        precision="tf32",
        num_warps=8,
        chunk_precision="ieee",
        chunk_warps=8,
    )
