"""Helpers shared by every op in `lctrain.kernels`."""
from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "torch", "naive")


def triton_interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1 set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, *tensors: torch.Tensor, op: str = "op") -> str:
    """Pick the implementation for `backend` (None = auto: Triton on CUDA, chunked torch otherwise)."""
    if backend is None:
        on_cuda = any(t is not None and t.is_cuda for t in tensors)
        return "triton" if on_cuda else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS} or None")
    if backend == "triton":
        on_cuda = any(t is not None and t.is_cuda for t in tensors)
        if not on_cuda and not triton_interpreting():
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing triton")
    return backend


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, batch: int, total: int, op: str) -> int:
    """Validate packed-document offsets; return the number of sequences N."""
    if cu_seqlens is None:
        return batch
    if batch != 1:
        raise ValueError(f"{op}: cu_seqlens needs batch size 1 (packed layout), got B={batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be 1-D [N+1], got shape {tuple(cu_seqlens.shape)}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(f"{op}: cu_seqlens must start at 0 and end at T={total}, got {cu_seqlens.tolist()}")
    return cu_seqlens.numel() - 1
