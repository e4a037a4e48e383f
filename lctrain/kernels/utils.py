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


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv_tensors(op: str, q, k, v) -> None:
    """q, k and v are 4-D tensors `[B, T, H, D]` of a float dtype; otherwise a one-line ValueError naming which."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{op}: {name} must be a 4-D tensor [B, T, H, D], got {shape}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} dtype {x.dtype} is not one of {FLOAT_DTYPES}")


def check_attention_qkv(q, k, v, op: str) -> None:
    """Softmax-attention inputs: q `[B, T, H, D]`, k `[B, T, Hkv, D]`, v `[B, T, Hkv, Dv]` with Hkv dividing H, one
    float dtype. Raises a one-line ValueError naming the bad argument."""
    check_qkv_tensors(op, q, k, v)
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if k.shape[:2] != q.shape[:2] or k.shape[-1] != head_dim or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{op}: k shape {tuple(k.shape)} must be [B, T, Hkv, D] = [{batch}, {length}, Hkv, "
                         f"{head_dim}] with Hkv dividing H={heads}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{op}: v shape {tuple(v.shape)} must be [B, T, Hkv, Dv] = "
                         f"[{batch}, {length}, {kv_heads}, Dv]")
    if head_dim == 0 or v.shape[-1] == 0:
        raise ValueError(f"{op}: head dims must be >= 1, got D={head_dim}, Dv={v.shape[-1]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def compiling() -> bool:
    """True while torch.compile traces: value checks (which read tensors) are skipped then; the batch's host
    metadata was validated once when the batch was built."""
    return torch.compiler.is_compiling()


def host_cu_seqlens(cu_seqlens, cu_seqlens_cpu, op: str) -> torch.Tensor | None:
    """The document offsets as an int32 CPU tensor, for everything shape-deciding.

    `cu_seqlens_cpu` as given (the batch's host copy, no device access), or else one copy of `cu_seqlens` (a
    device-to-host sync on CUDA: the eager convenience for evaluation and tests).
    """
    if cu_seqlens_cpu is None:
        if cu_seqlens is None:
            return None
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            kind = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
            raise ValueError(f"{op}: cu_seqlens must be an int32 or int64 tensor [N+1], got {kind}")
        return cu_seqlens.detach().to("cpu", torch.int32)
    if not isinstance(cu_seqlens_cpu, torch.Tensor) or cu_seqlens_cpu.dtype not in (torch.int32, torch.int64):
        kind = cu_seqlens_cpu.dtype if isinstance(cu_seqlens_cpu, torch.Tensor) else type(cu_seqlens_cpu).__name__
        raise ValueError(f"{op}: cu_seqlens_cpu must be an int32 or int64 CPU tensor [N+1], got {kind}")
    if cu_seqlens_cpu.device.type != "cpu":
        raise ValueError(f"{op}: cu_seqlens_cpu must be on the CPU (the host copy of cu_seqlens), got "
                         f"{cu_seqlens_cpu.device}")
    if cu_seqlens is not None and tuple(cu_seqlens.shape) != tuple(cu_seqlens_cpu.shape):
        raise ValueError(f"{op}: cu_seqlens_cpu shape {tuple(cu_seqlens_cpu.shape)} must equal cu_seqlens shape "
                         f"{tuple(cu_seqlens.shape)} (the same offsets)")
    return cu_seqlens_cpu if cu_seqlens_cpu.dtype == torch.int32 else cu_seqlens_cpu.to(torch.int32)


def device_cu_seqlens(cu_seqlens, cu_seqlens_cpu, device) -> torch.Tensor | None:
    """The offsets on the op's device: `cu_seqlens` as given, or one host-to-device copy of the host offsets."""
    if cu_seqlens is not None:
        return cu_seqlens
    if cu_seqlens_cpu is None:
        return None
    return cu_seqlens_cpu.to(device, torch.int32, non_blocking=True)


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, batch: int, total: int, op: str) -> int:
    """Validate packed-document offsets (pass the HOST copy, see `host_cu_seqlens`); return the number of
    sequences N. Values are checked in eager mode only (see `compiling`)."""
    if cu_seqlens is None:
        return batch
    if batch != 1:
        raise ValueError(f"{op}: cu_seqlens needs batch size 1 (packed layout), got B={batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be 1-D [N+1], got shape {tuple(cu_seqlens.shape)}")
    if not compiling() and cu_seqlens.device.type == "cpu":
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != total:
            raise ValueError(f"{op}: cu_seqlens must start at 0 and end at T={total}, got {offsets}")
        if any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {offsets}")
    return cu_seqlens.numel() - 1


MAX_GRID_AXIS0 = 2**31 - 1  # CUDA's limit on grid axis 0
MAX_GRID_AXIS12 = 65535  # and on axes 1 and 2


def triton_or_torch(op: str, module: str, backend: str | None) -> str:
    """`"triton"` when the op's optional Triton module imports; otherwise `"torch"` for auto dispatch, or a one-line
    ValueError when `backend="triton"` was asked for explicitly."""
    import importlib
    try:
        importlib.import_module(module)
    except ImportError:
        if backend == "triton":
            raise ValueError(f"{op}: backend='triton' is not available (no Triton kernels for this op in this "
                             "build); use backend='torch' or 'naive'") from None
        return "torch"
    return "triton"


def check_triton_documents(op: str, num_seqs: int, heads: int) -> None:
    """One-line ValueError for a batch no launch grid can hold. The linear-attention and Taylor kernels put
    documents x heads on grid axis 0 (up to 2^31 - 1), the local and landmark kernels their tiles on axis 0 and
    heads on axis 1 (up to 65,535); anything a packed batch with int32 offsets can hold passes."""
    if heads > MAX_GRID_AXIS12:
        raise ValueError(f"{op}: backend='triton' handles at most {MAX_GRID_AXIS12} heads (grid axis 1), got "
                         f"{heads}")
    if num_seqs * heads > MAX_GRID_AXIS0:
        raise ValueError(f"{op}: backend='triton' handles at most {MAX_GRID_AXIS0} documents x heads per call "
                         f"(grid axis 0), got {num_seqs} x {heads}; split the batch")
