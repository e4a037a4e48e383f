"""Block sizes of the `local_attention` Triton kernels, as a pure function of the head dims (no autotuning).

A launch uses exactly `launch_config(D, Dv, kernel)`, so the ahead-of-time compile check (`aot_specs` in
`triton_local.py`) enumerates every configuration a launch can use, and the interpreter needs no autotuner.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton

MAX_HEAD_DIM = 128
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # padded width BD of q/k and v; narrower heads are padded up to 16
KERNELS = ("fwd", "bwd_dq", "bwd_dkv")


@dataclass(frozen=True)
class LaunchConfig:
    """block_m: queries per block (BM). block_n: keys per block (BN). block_d / block_dv: padded widths of the
    q/k and v heads (equal: one padded width per launch halves the number of compiled variants)."""

    block_m: int
    block_n: int
    block_d: int
    block_dv: int
    num_warps: int
    num_stages: int


def padded_dim(dim: int) -> int:
    """Head dim rounded up to a power of two >= 16 (the smallest `tl.dot` operand)."""
    return max(16, triton.next_power_of_2(dim))


def launch_config(head_dim: int, value_dim: int, kernel: str) -> LaunchConfig:
    """Configuration of `kernel` (one of `KERNELS`) for head dims D and Dv (each <= 128).

    Sizes chosen so every configuration compiles for sm_80 and sm_90 in bf16 and fp32 without register spills
    (checked by `python -m lctrain.kernels.aot`): the backward kernels keep more tiles live (q, k, v, do, two
    score tiles, two accumulators) and use 32 x 32 blocks (32 x 16 for dq of 128-wide heads), and heads of 64 or
    more get 8 warps (with 4, fp32 tiles of 128-wide heads spill on sm_80).
    """
    for name, dim in (("D", head_dim), ("Dv", value_dim)):
        if dim < 1 or dim > MAX_HEAD_DIM:
            raise ValueError(f"local_attention: head dim {name}={dim} is not supported by the Triton kernels "
                             f"(1 <= {name} <= {MAX_HEAD_DIM})")
    if kernel not in KERNELS:
        raise ValueError(f"local_attention: kernel={kernel!r} is not one of {KERNELS}")
    width = padded_dim(max(head_dim, value_dim))
    warps = 8 if width >= 64 else 4
    # 128-wide heads take 16-key blocks in the forward and dq kernels: with 32, the 64-bit key-block addressing
    # tips fp32 into spills (8-32 bytes on sm_80 / sm_90).
    block_n = 16 if width >= 128 and kernel != "bwd_dkv" else 32
    if kernel == "fwd":
        return LaunchConfig(64, block_n, width, width, num_warps=warps, num_stages=1)
    return LaunchConfig(32, block_n, width, width, num_warps=warps, num_stages=1)
