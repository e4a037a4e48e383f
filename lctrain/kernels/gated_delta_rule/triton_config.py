"""Block sizes of the Triton Gated DeltaNet kernels as a pure function of (K, V, dtype).

No autotuning: what a launch uses is exactly `launch_config(K, V, dtype)`, so `aot_specs` in
`triton_chunk.py` can list every configuration and compile it for real GPUs on a machine without one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

MAX_KEY_DIM = 128  # the state kernels hold all of K (padded to a power of two) in registers
SUPPORTED_KEY_DIMS = (16, 32, 64, 128)
SUPPORTED_VALUE_DIMS = (16, 32, 64, 128, 256)
DTYPES = ("bf16", "fp16", "fp32")
TORCH_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Tokens per chunk by q/k/v element type. bf16/fp16 tiles are half the registers of fp32 ones, so 64-token
# chunks (the C x C tiles A, Aqk and their gradients) compile spill-free on sm_80 and sm_90 for every
# supported head dim. fp32 stays at 32: at 64 the state kernels spill at K = 128 (backward, sm_90: 280 B of
# stack at 8 warps, 480 B at 16, 16 B with 8-column state blocks) and the dw/WY/inverse kernels on sm_80.
CHUNK_SIZE = {"bf16": 64, "fp16": 64, "fp32": 32}


@dataclass(frozen=True)
class LaunchConfig:
    """One launch configuration.

    chunk: tokens per chunk (BT).
    key_block / value_block: BK / BV of the forward per-chunk kernels and of the WY backward, which loop
        over K and V.
    intra_key_block / intra_value_block: BK / BV of the other backward per-chunk kernels (dv, dq, dk, dw),
        which nest a V loop inside a K loop and so get the smallest blocks.
    state_key_block: BK of the state kernels, all of K padded to a power of two (the state is K x BV).
    state_value_block: BV of the state kernels (V is split over programs).
    precision: `tl.dot` input precision. num_warps, num_stages: of every kernel (the launch passes both, and
        the ahead-of-time check compiles exactly these, so what is checked for spills is what runs).
    """

    chunk: int
    key_block: int
    value_block: int
    intra_key_block: int
    intra_value_block: int
    state_key_block: int
    state_value_block: int
    precision: str
    num_warps: int
    num_stages: int = 1  # software pipelining buys nothing in these loop-carried kernels and costs registers


def launch_config(key_dim: int, value_dim: int, dtype: str) -> LaunchConfig:
    """Configuration for head dims K (1..128) and V (>= 1) and q/k/v element type `dtype` (one of DTYPES).

    Sizes were chosen with the ahead-of-time check (`python -m lctrain.kernels.aot`): every configuration
    compiles for sm_80 and sm_90 without register spills.
    """
    if not 1 <= key_dim <= MAX_KEY_DIM:
        raise ValueError(f"gated_delta_rule: key dim K={key_dim} is not supported by the Triton kernels "
                         f"(1 <= K <= {MAX_KEY_DIM})")
    if value_dim < 1:
        raise ValueError(f"gated_delta_rule: value dim V={value_dim} must be >= 1")
    if dtype not in DTYPES:
        raise ValueError(f"gated_delta_rule: dtype={dtype!r} is not one of {DTYPES}")
    # tl.dot needs every block dimension >= 16.
    padded_k = max(16, triton.next_power_of_2(key_dim))
    padded_v = max(16, triton.next_power_of_2(value_dim))
    chunk = CHUNK_SIZE[dtype]
    # With 64-row chunks, bf16 64x16 tiles in both products of the output kernel (K = V = 16) take an 8-byte
    # stack frame on sm_80; 32 columns (masked beyond V) do not.
    narrowest_value_block = 32 if chunk == 64 else 16
    return LaunchConfig(
        chunk=chunk,
        key_block=min(padded_k, 64),
        value_block=min(max(padded_v, narrowest_value_block), 64),
        intra_key_block=min(padded_k, 32),
        intra_value_block=min(padded_v, 32),
        state_key_block=padded_k,
        # The K x BV fp32 state and the chunk's K-wide operand tiles must fit in registers; narrow blocks
        # also give the sequential state kernels more programs (N H V / BV) to spread over the GPU.
        state_value_block=min(padded_v, 32 if padded_k <= 64 else 16),
        # Only fp32 operands read this: tf32 tensor-core dots (IEEE fp32 dots run on CUDA cores and spill at
        # these tile sizes; the interpreter computes in full fp32). bf16/fp16 operands run bf16/fp16 dots.
        precision="tf32",
        num_warps=8,
    )
