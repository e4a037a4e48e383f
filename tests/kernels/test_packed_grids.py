"""Launch grids over many documents and long ones: the tile tables of the local and landmark kernels, the
documents x heads axis of the linear and Taylor kernels, and the split 64-bit tile starts (`split_row`), checked
by running the four ops on one packed batch — many documents (some empty) and one longer than `ROW_SPAN`
tokens — in the Triton interpreter against the float64 torch path.

A document whose in-document offsets really pass 2^31 elements (524,288 tokens at H = 16, D = 256) cannot be
run on a CPU; the AOT tests compile the 64-bit arithmetic and `test_launch_table` checks the grids at 4M tokens.
"""
from __future__ import annotations

import pytest
import torch

from lctrain import kernels
from lctrain.kernels.addressing import ROW_SPAN
from lctrain.kernels.tiles import tile_table

INTERPRETED = pytest.mark.skipif(not kernels.utils.triton_interpreting(), reason="needs TRITON_INTERPRET=1")


def test_tile_table_lists_every_tile_of_every_document_in_order():
    cu = torch.tensor([0, 5, 5, 21, 22], dtype=torch.int32)  # lengths 5, 0, 16, 1
    assert tile_table(cu, 8).tolist() == [[0, 0], [2, 0], [2, 1], [3, 0]]
    # two sub-tiles per 8-token tile (a landmark block split into query tiles)
    assert tile_table(cu, 8, 2).tolist() == [[0, 0], [0, 1], [2, 0], [2, 1], [2, 2], [2, 3], [3, 0], [3, 1]]
    assert tile_table(torch.tensor([0, 0], dtype=torch.int32), 8).shape == (0, 2)


def _packed_batch(long: bool):
    """16 short documents (0 .. 22 tokens, empty ones included) and, with `long`, one of ROW_SPAN + 76 tokens
    between them (the high part of its later tile starts is non-zero): offsets and total length."""
    lengths = [(7 * i) % 23 for i in range(16)]
    if long:
        lengths = lengths[:8] + [ROW_SPAN + 76] + lengths[8:]
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32), sum(lengths)


def _run(op, backend, leaves, cu):
    q, k, v, gate = leaves
    if op == "linear_attention":
        o, final = kernels.linear_attention(q, k, v, gate, output_final_state=True, cu_seqlens=cu, backend=backend)
        outs = (o, final)
    elif op == "local_attention":
        outs = (kernels.local_attention(q, k, v, 40, sink=3, cu_seqlens=cu, backend=backend),)
    elif op == "landmark_attention":
        outs = (kernels.landmark_attention(q, k, v, 64, cu_seqlens=cu, backend=backend),)
    else:
        o, final = kernels.taylor_linear_attention(q[..., :4], k[..., :4], v, output_final_state=True,
                                                   cu_seqlens=cu, backend=backend)
        outs = (o, final)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
               for i, o in enumerate(outs)]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, [x for x in leaves if x.requires_grad])
    return [t.double() for t in (*outs, *grads)]


OPS = ["linear_attention", "local_attention", "landmark_attention", "taylor_linear_attention"]


def _check_against_torch(op, long):
    cu, total = _packed_batch(long)
    heads, dim = 2, 16
    torch.manual_seed(0)
    leaves = [torch.randn(1, total, heads, dim) for _ in range(3)] + [-torch.rand(1, total, heads)]
    leaves[1] = torch.nn.functional.normalize(leaves[1], dim=-1)  # keep the Taylor polynomial's scores small
    gated = op == "linear_attention"  # the log-decay is an input of linear attention only
    expected = _run(op, "torch", [x.double().requires_grad_(i < 3 or gated) for i, x in enumerate(leaves)], cu)
    actual = _run(op, "triton", [x.requires_grad_(i < 3 or gated) for i, x in enumerate(leaves)], cu)
    assert len(actual) == len(expected)
    for index, (got, ref) in enumerate(zip(actual, expected)):
        assert got.shape == ref.shape, index
        assert torch.isfinite(got).all(), index  # buffers start as NaN: a skipped tile shows up here
        error = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-2)).item()
        assert error < 1e-4, (op, index, error)


@INTERPRETED
@pytest.mark.parametrize("op", OPS)
def test_many_packed_documents_match_torch(op):
    """16 documents x 2 heads: the linear/Taylor grids decode (document, head) from axis 0, the local/landmark
    kernels read (document, tile) from their tile tables."""
    _check_against_torch(op, long=False)


@INTERPRETED
@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_many_documents_and_one_longer_than_the_row_span_match_torch(op):
    _check_against_torch(op, long=True)
