"""Launch table of the `attention` Triton kernels: block sizes as a pure function of the head dims (no autotune).
The launcher (`triton_attention.py`) and the ahead-of-time compile list (`aot_specs`) both read `launch_config`,
so the checked configurations are exactly the launched ones."""
from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD_DIM = 128
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # padded width of q/k and v heads; narrower heads are padded up
KERNELS = ("fwd", "bwd_dq", "bwd_dkv")


@dataclass(frozen=True)
class LaunchConfig:
    """block_m: queries per block; block_n: keys per block; block_d: padded head width (q/k and v share it)."""
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def padded_dim(dim: int) -> int:
    width = 16
    while width < dim:
        width *= 2
    return width


def launch_config(head_dim: int, value_dim: int, kernel: str) -> LaunchConfig:
    """Configuration of `kernel` for head dims D and Dv (each <= 128). The forward keeps q, k, v, the score tile and
    one accumulator live and takes 64 x 64 tiles; the backward kernels keep two more tiles (dO and a second
    accumulator) and take 64 x 32 (dq) / 32 x 64 (dkv). Heads of 64 or more get 8 warps (4 spill fp32 tiles of
    128-wide heads on sm_80); every entry is compile-checked for sm_80 / sm_90 in bf16 and fp32."""
    for name, dim in (("D", head_dim), ("Dv", value_dim)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"attention: head dim {name}={dim} is not supported by the Triton kernels "
                             f"(1 <= {name} <= {MAX_HEAD_DIM})")
    if kernel not in KERNELS:
        raise ValueError(f"attention: kernel={kernel!r} is not one of {KERNELS}")
    width = padded_dim(max(head_dim, value_dim))
    warps = 8 if width >= 64 else 4
    if kernel == "fwd":
        return LaunchConfig(64, 64 if width <= 64 else 32, width, warps, 1)
    if kernel == "bwd_dq":
        return LaunchConfig(64, 32, width, warps, 1)
    return LaunchConfig(32, 64 if width <= 64 else 32, width, warps, 1)
