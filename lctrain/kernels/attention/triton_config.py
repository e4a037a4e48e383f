"""Launch table of the `attention` Triton kernels: block sizes as a pure function of the head dims (no autotune).
The launcher (`triton_attention.py`) and the ahead-of-time compile list (`aot_specs`) both read `launch_config`,
so the checked configurations are exactly the launched ones."""
from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD_DIM = 128
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # padded width of q/k and v heads; narrower heads are padded up
KERNELS = ("fwd", "bwd_dq", "bwd_dkv")
DTYPES = ("bf16", "fp32")


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


def launch_config(head_dim: int, value_dim: int, kernel: str, dtype: str = "bf16") -> LaunchConfig:
    """Configuration of `kernel` for head dims D and Dv (each <= 128) and element type `dtype` ("bf16" for bf16 /
    fp16 inputs, "fp32").

    bf16: the forward keeps q, k, v, the score tile and one accumulator live and takes 64 x 64 tiles (64 x 32 for
    128-wide heads); the backward kernels keep two more tiles (dO and a second accumulator) and take 64 x 32 (dq) /
    32 x 64 (dkv, 32 x 32 for 128-wide heads). fp32 tiles take twice the registers: 64 x 32 forward tiles from
    64-wide heads and 32 x 32 tiles for 128-wide heads, where the bf16 sizes spill (sm_80 / sm_90 compile check).
    Heads of 64 or more get 8 warps. Every entry is compile-checked for sm_80 / sm_90 without spills.
    """
    for name, dim in (("D", head_dim), ("Dv", value_dim)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"attention: head dim {name}={dim} is not supported by the Triton kernels "
                             f"(1 <= {name} <= {MAX_HEAD_DIM})")
    if kernel not in KERNELS:
        raise ValueError(f"attention: kernel={kernel!r} is not one of {KERNELS}")
    if dtype not in DTYPES:
        raise ValueError(f"attention: dtype={dtype!r} is not one of {DTYPES}")
    width = padded_dim(max(head_dim, value_dim))
    warps = 8 if width >= 64 else 4
    wide = width > 64
    if dtype == "fp32":
        if kernel == "fwd":
            return LaunchConfig(32 if wide else 64, 32 if width >= 64 else 64, width, warps, 1)
        if kernel == "bwd_dq":
            return LaunchConfig(32 if wide else 64, 32, width, warps, 1)
        return LaunchConfig(32, 32 if wide else 64, width, warps, 1)
    if kernel == "fwd":
        return LaunchConfig(64, 32 if wide else 64, width, warps, 1)
    if kernel == "bwd_dq":
        return LaunchConfig(64, 32, width, warps, 1)
    return LaunchConfig(32, 32 if wide else 64, width, warps, 1)


def config_dtype(dtype) -> str:
    """The launch-table element type of a torch dtype: "fp32" for float32, "bf16" for bf16 / fp16."""
    import torch
    return "fp32" if dtype == torch.float32 else "bf16"
