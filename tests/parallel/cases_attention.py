"""Distributed cases for `sp_attention` (allgather / ulysses / ring) against full-sequence masked attention."""
from __future__ import annotations

import pytest
import torch

from lctrain.parallel import comm, gather_sequence, shard_batch, sp_attention
from tests.parallel.reference_ops import masked_attention
from tests.parallel.sharding_helpers import full_doc_ids
from tests.parallel.util import assert_close, leaves, packed_positions

DOCS = [[4, 9, 1, 13, 40], [11, 2, 6, 30]]
HEAD_DIM = 3


def _run(groups, mode: str, layout: str, length: int, heads: int, kv_heads: int, dtype=torch.float64,
         backend: str | None = None, tol: float = 1e-10, head_dim: int = HEAD_DIM, docs=DOCS):
    """The float64 reference on the whole rows vs `sp_attention` on this rank's shard in `dtype` (with the
    attention op's `backend`): outputs and every gradient, gathered."""
    rows = len(docs)
    positions = packed_positions(rows, length, docs)
    batch = {"position_ids": positions,
             "q": torch.randn(rows, length, heads, head_dim, dtype=torch.float64),
             "k": torch.randn(rows, length, kv_heads, head_dim, dtype=torch.float64),
             "v": torch.randn(rows, length, kv_heads, head_dim, dtype=torch.float64),
             "grad": torch.randn(rows, length, heads, head_dim, dtype=torch.float64)}
    names = ["q", "k", "v"]
    full = leaves(batch, names)
    o_ref = masked_attention(full["q"], full["k"], full["v"], full_doc_ids(positions))
    (o_ref * batch["grad"]).sum().backward()

    local, placement = shard_batch({k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()},
                                   groups.sp_rank, groups.sp_size, layout, groups=groups)
    mine = leaves(local, names)
    o = sp_attention(mine["q"], mine["k"], mine["v"], placement, mode, backend=backend)
    assert o.dtype == dtype
    (o * local["grad"]).sum().backward()
    assert_close(gather_sequence(o.detach(), placement).double(), o_ref.detach(), f"{mode} output", tol)
    for name in names:
        assert mine[name].grad.dtype == dtype
        assert_close(gather_sequence(mine[name].grad, placement).double(), full[name].grad, f"{mode} d{name}", tol)
    return placement


def _case(mode, layout):
    def run(groups):
        w = groups.sp_size
        _run(groups, mode, layout, 5 * w + 3, heads=2 * w, kv_heads=w)
    return run


def triton_case(mode, layout):
    """fp32 through the Triton kernels (interpreter), 16-wide heads, a document crossing every rank."""
    def run(groups):
        w = groups.sp_size
        _run(groups, mode, layout, 8 * w + 5, heads=2 * w, kv_heads=w, dtype=torch.float32, backend="triton",
             tol=2e-5, head_dim=16, docs=[[3, 1, 100]])
    return run


def _bf16_case(mode):
    """bf16 blocks with float32 accumulation stay within bf16 rounding of the float64 result."""
    def run(groups):
        w = groups.sp_size
        _run(groups, mode, "zigzag", 6 * w + 1, heads=2 * w, kv_heads=w, dtype=torch.bfloat16, tol=5e-2,
             head_dim=8)
    return run


def _bytes(mode):
    """Traffic of one forward + backward equals the analytic volume."""
    def run(groups):
        w, rows, heads, kv_heads = groups.sp_size, 2, 2 * groups.sp_size, groups.sp_size
        comm.comm_stats(reset=True)
        placement = _run(groups, mode, "zigzag", 5 * w + 3, heads, kv_heads)
        stats = comm.comm_stats(reset=True)
        tokens = rows * placement.local_len * HEAD_DIM * 8            # bytes of one local head column
        kv, q = 2 * kv_heads * tokens, heads * tokens
        expected = {"allgather": (4 * (w - 1) * kv, 2),
                    "ulysses": (2 * 2 * (w - 1) * (q + kv + q) // w, 4),
                    "ring": (2 * (w - 1) * kv + 2 * (w - 1) * kv + 2 * w * kv, 3 * w - 2)}[mode]
        assert (stats["comm_bytes_attn"], stats["comm_calls_attn"]) == expected, (stats, expected)
        assert stats["comm_bytes_linear"] == 0 and stats["comm_bytes_conv"] == 0, stats
    return run


def _ulysses_rejects_indivisible_heads(groups):
    w = groups.sp_size
    positions = packed_positions(1, 4 * w, [[3, 50]])
    q = torch.randn(1, 4 * w, w + 1, HEAD_DIM, dtype=torch.float64)
    local, placement = shard_batch({"position_ids": positions, "q": q}, groups.sp_rank, w, "contiguous",
                                   groups=groups)
    with pytest.raises(ValueError, match="divisible by the SP size"):
        sp_attention(local["q"], local["q"], local["q"], placement, "ulysses")


CASES = {f"{mode}_{layout}": _case(mode, layout)
         for mode in ("allgather", "ulysses", "ring") for layout in ("contiguous", "zigzag")}
CASES.update({f"{mode}_bytes": _bytes(mode) for mode in ("allgather", "ulysses", "ring")})
CASES.update({f"{mode}_bf16": _bf16_case(mode) for mode in ("allgather", "ulysses", "ring")})
CASES["ulysses_rejects_indivisible_heads"] = _ulysses_rejects_indivisible_heads
