"""In-document offsets past 2^31 elements, run for real in the Triton interpreter.

With H = 32,768 heads of 32 dims, one token row is 2^20 elements, so token 2,048 of a document sits 2^31 elements
from the document's start (the row stride stays within `max_row_stride`, which the launchers enforce). The
tensors are allocated but never filled (the pages of an untouched allocation take no memory); only head 0 is
written and only head 0's programs are launched. Each forward kernel must give exactly what it gives on a
one-head copy of the same data, where every offset is small. With 32-bit in-document offsets the far tokens are
read from wrapped addresses: this test then crashes the interpreter (checked by hand), it cannot pass.
"""
from __future__ import annotations

import pytest
import torch

from lctrain.kernels import utils

INTERPRETED = pytest.mark.skipif(not utils.triton_interpreting(), reason="needs TRITON_INTERPRET=1")

HEADS, DIM, TOKENS = 32768, 32, 2100  # row stride 2^20 elements: tokens >= 2048 pass 2^31
FAR = 2048


def _spread(small: torch.Tensor, heads: int) -> torch.Tensor:
    """`[T, 1, ...]` -> `[T, heads, ...]` holding `small` in head 0; the other heads are never touched."""
    try:
        big = torch.empty(small.shape[0], heads, *small.shape[2:], dtype=small.dtype)
    except RuntimeError as error:  # an allocator that refuses large untouched allocations
        pytest.skip(f"cannot reserve {heads}-head tensors here: {error}")
    big[:, :1] = small
    return big


def _empty_like_heads(shape, heads, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype) if heads == 1 else torch.empty(shape, dtype=dtype)


def _inputs(heads, key_dim=DIM):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(TOKENS, 1, dim, generator=generator) for dim in (key_dim, key_dim, DIM))
    g = -torch.rand(TOKENS, 1, generator=generator)
    if heads == 1:
        return q, k, v, g
    return _spread(q, heads), _spread(k, heads), _spread(v, heads), _spread(g, heads)


def _linear(heads):
    from lctrain.kernels.linear_attention.triton_config import launch_config
    from lctrain.kernels.linear_attention.triton_fwd import linear_attention_fwd_kernel

    q, k, v, g = _inputs(heads)
    cfg = launch_config(DIM, DIM, "fp32", "fwd")
    cu = torch.tensor([0, TOKENS], dtype=torch.int32)
    state = torch.zeros(1, heads, DIM, DIM) if heads == 1 else _spread(torch.zeros(1, 1, DIM, DIM), heads)
    o_part = _empty_like_heads((1, TOKENS, heads, DIM), heads)
    final = _empty_like_heads((1, heads, DIM, DIM), heads)
    linear_attention_fwd_kernel[(1, 1)](  # program 0: document 0, head 0
        q, k, v, g, state, o_part, final, cu, 0.2, TOKENS, heads, DIM, DIM,
        BT=cfg.chunk, BK=cfg.block_k, BV=cfg.block_v, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o_part[0, :, 0].clone(), final[0, 0].clone()


def _local(heads):
    from lctrain.kernels.local_attention.triton_config import launch_config
    from lctrain.kernels.local_attention.triton_fwd import local_attention_fwd_kernel

    q, k, v, _ = _inputs(heads)
    cfg = launch_config(DIM, DIM, "fwd")
    cu = torch.tensor([0, TOKENS], dtype=torch.int32)
    spans = torch.full((heads,), 100, dtype=torch.int32), torch.full((heads,), 4, dtype=torch.int32)
    first = FAR // cfg.block_m - 1  # the block ending at token FAR and every later one
    tiles = torch.tensor([[0, i] for i in range(first, -(-TOKENS // cfg.block_m))], dtype=torch.int32)
    o = _empty_like_heads((TOKENS, heads, DIM), heads)
    lse = _empty_like_heads((TOKENS, heads), heads)
    local_attention_fwd_kernel[(tiles.shape[0], 1)](
        q, k, v, o, lse, *spans, cu, tiles, 0.2, heads, heads, DIM, DIM,
        BM=cfg.block_m, BN=cfg.block_n, BD=cfg.block_d, BDV=cfg.block_dv, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    start = first * cfg.block_m
    return o[start:, 0].clone(), lse[start:, 0].clone()


def _landmark(heads):
    from lctrain.kernels.landmark_attention.triton_config import launch_config
    from lctrain.kernels.landmark_attention.triton_fwd import landmark_fwd_kernel

    q, k, v, _ = _inputs(heads)
    block = 64
    cfg = launch_config(DIM, DIM, block, "fwd")
    per_block = -(-block // cfg.block_m)
    cu = torch.tensor([0, TOKENS], dtype=torch.int32)
    tiles = torch.tensor([[0, i] for i in range(FAR // block * per_block, -(-TOKENS // block) * per_block)],
                         dtype=torch.int32)
    o = _empty_like_heads((TOKENS, heads, DIM), heads)
    lse = _empty_like_heads((TOKENS, heads), heads)
    landmark_fwd_kernel[(tiles.shape[0], 1)](
        q, k, v, o, lse, cu, tiles, 0.2, heads, block,
        BM=cfg.block_m, BN=cfg.block_n, D=cfg.block_d, DV=cfg.block_dv, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return o[FAR:, 0].clone(), lse[FAR:, 0].clone()


def _taylor(heads):
    from lctrain.kernels.taylor_linear_attention.triton_chunk import launch_config
    from lctrain.kernels.taylor_linear_attention.triton_fwd import taylor_fwd_kernel

    features = 4
    q, k, v, _ = _inputs(heads, features)
    cfg = launch_config(features, "fwd")
    cu = torch.tensor([0, TOKENS], dtype=torch.int32)
    rows = 1 + features + features * features
    state = torch.zeros(1, 1, rows, DIM + 1) if heads == 1 else _spread(torch.zeros(1, 1, rows, DIM + 1), heads)
    y = _empty_like_heads((TOKENS, heads, DIM + 1), heads)
    taylor_fwd_kernel[(1, -(-(DIM + 1) // cfg.block_v))](  # head 0 of document 0, every value block
        q, k, v, y, state, cu, 0.2, heads, features, DIM,
        BT=cfg.chunk, BD=cfg.block_d, BV=cfg.block_v, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y[:, 0].clone(), state[0, 0].clone()


@INTERPRETED
@pytest.mark.parametrize("run", [_linear, _local, _landmark, _taylor], ids=lambda f: f.__name__[1:])
def test_forward_kernels_address_past_2_31_elements_in_one_document(run):
    from lctrain.kernels.addressing import max_row_stride

    assert FAR * HEADS * DIM == 2**31 and HEADS * (DIM + 1) <= max_row_stride()
    expected = run(1)
    actual = run(HEADS)
    for got, want in zip(actual, expected):
        assert torch.isfinite(want).all()
        assert torch.equal(got, want)
