"""Block sizes for the `linear_attention` Triton kernels, as a small function of the head dims.

There is no autotuning: a launch uses exactly `launch_config(K, V, dtype, kernel)`, so the
ahead-of-time compile check (`aot_specs` in `triton_chunk.py`) can enumerate every configuration a launch can
ever use. The interpreter needs this too (the autotuner benchmarks on a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import triton

MAX_KEY_DIM = 128
SUPPORTED_KEY_DIMS = (16, 32, 64, 128)
SUPPORTED_VALUE_DIMS = (16, 32, 64, 128, 256)
DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class LaunchConfig:
    """One launch configuration.

    chunk: tokens per chunk (BT). block_k: key columns per program (BK); the key dim is split over
    `cdiv(K, BK)` programs (the decay-gradient kernel takes the whole key dim in one block).
    block_v: value columns per program (BV); the value dim is split over `cdiv(V, BV)` programs.
    """

    chunk: int
    block_k: int
    block_v: int
    num_warps: int
    num_stages: int


KERNELS = ("fwd", "bwd_dq", "bwd_dkv", "dlog_decay")


def launch_config(key_dim: int, value_dim: int, dtype: str, kernel: str) -> LaunchConfig:
    """Configuration of `kernel` (one of `KERNELS`) for head dims K (<= 128) and V, with `dtype` one of
    `DTYPES` (the q/k/v element type).

    The sizes were chosen so that every configuration compiles for sm_80 and sm_90 without register spills
    (checked by `python -m lctrain.kernels.aot`).
    """
    if key_dim < 1 or key_dim > MAX_KEY_DIM:
        raise ValueError(f"linear_attention: key dim K={key_dim} is not supported by the Triton kernels "
                         f"(1 <= K <= {MAX_KEY_DIM})")
    if value_dim < 1:
        raise ValueError(f"linear_attention: value dim V={value_dim} must be >= 1")
    if dtype not in DTYPES:
        raise ValueError(f"linear_attention: dtype={dtype!r} is not one of {DTYPES}")
    if kernel not in KERNELS:
        raise ValueError(f"linear_attention: kernel={kernel!r} is not one of {KERNELS}")
    if kernel == "dlog_decay":
        # Four [BT, BK] tiles over the whole key dim and nothing else: keep BT * BK at 2048 elements.
        block_k = max(32, triton.next_power_of_2(key_dim))
        return LaunchConfig(chunk=max(16, min(64, 2048 // block_k)), block_k=block_k, block_v=32,
                            num_warps=4, num_stages=1)
    # Linear attention splits exactly over key and value blocks, so wide heads run as several programs
    # (partial results summed on the host side) instead of spilling registers. Heads narrower than 32 are
    # padded to 32: it halves the number of compiled variants for little cost. fp32 tiles take twice the
    # registers, and the backward kernels hold more tiles, hence their narrower key block.
    widest_k = 64 if dtype != "fp32" and kernel == "fwd" else 32
    block_k = min(widest_k, max(32, triton.next_power_of_2(key_dim)))
    # dk/dv keep the most tiles live (q, k, v, do, two [BT, BT] score tiles, two accumulators, dS): shorter
    # chunk there. Measured spill-free on sm_80 and sm_90 in bf16 and fp32.
    chunk = 32 if kernel == "bwd_dkv" else 64
    return LaunchConfig(chunk=chunk, block_k=block_k, block_v=32, num_warps=8, num_stages=1)
