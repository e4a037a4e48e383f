"""Distributed cases for the short-conv halo exchange against a document-resetting causal conv."""
from __future__ import annotations

import pytest
import torch

from lctrain.parallel import comm, gather_sequence, shard_batch
from lctrain.models.shortconv import ShortConvolution
from lctrain.parallel.halo import drop_halo, extend_with_halo, sp_short_conv, sp_short_conv_halo
from tests.parallel.reference_ops import document_causal_conv
from tests.parallel.sharding_helpers import full_doc_ids
from tests.parallel.util import all_sum, assert_close, packed_positions

DOCS = [[2, 7, 1, 5, 40], [9, 3, 30]]
CHANNELS = 3


def _run(groups, layout: str, kernel_size: int):
    rows, length = 2, 5 * groups.sp_size + 3
    positions = packed_positions(rows, length, DOCS)
    x = torch.randn(rows, length, CHANNELS, dtype=torch.float64)
    weight = torch.randn(CHANNELS, kernel_size, dtype=torch.float64)
    grad = torch.randn(rows, length, CHANNELS, dtype=torch.float64)
    x_full, w_full = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    y_ref = document_causal_conv(x_full, w_full, full_doc_ids(positions))
    (y_ref * grad).sum().backward()

    local, placement = shard_batch({"position_ids": positions, "x": x, "grad": grad}, groups.sp_rank,
                                   groups.sp_size, layout, groups=groups)
    x_local, w_local = local["x"].clone().requires_grad_(True), weight.clone().requires_grad_(True)
    halo = sp_short_conv_halo(x_local, kernel_size, placement)
    x_ext, positions_ext = extend_with_halo(x_local, halo, placement)
    y = drop_halo(document_causal_conv(x_ext, w_local, full_doc_ids(positions_ext)), kernel_size, placement)
    (y * local["grad"]).sum().backward()
    assert_close(gather_sequence(y.detach(), placement), y_ref.detach(), "conv output")
    assert_close(gather_sequence(x_local.grad, placement), x_full.grad, "dx")
    assert_close(all_sum(w_local.grad), w_full.grad, "dweight")
    return placement


def _module(layout):
    """The model's ShortConvolution (SiLU included) through `sp_short_conv`, as a mixer calls it."""
    def run(groups):
        rows, length = 2, 5 * groups.sp_size + 3
        positions = packed_positions(rows, length, DOCS)
        conv = ShortConvolution(CHANNELS, kernel_size=3).double()
        x = torch.randn(rows, length, CHANNELS, dtype=torch.float64)
        grad = torch.randn(rows, length, CHANNELS, dtype=torch.float64)
        x_full = x.clone().requires_grad_(True)
        (conv(x_full, positions) * grad).sum().backward()
        weight_grad, conv.weight.grad = conv.weight.grad.clone(), None
        local, placement = shard_batch({"position_ids": positions, "x": x, "grad": grad}, groups.sp_rank,
                                       groups.sp_size, layout, groups=groups)
        x_local = local["x"].clone().requires_grad_(True)
        y = sp_short_conv(conv, x_local, placement)
        (y * local["grad"]).sum().backward()
        assert_close(gather_sequence(y.detach(), placement), conv(x, positions).detach(), "module output")
        assert_close(gather_sequence(x_local.grad, placement), x_full.grad, "module dx")
        assert_close(all_sum(conv.weight.grad), weight_grad, "module dweight")
    return run


def _case(layout, kernel_size):
    return lambda groups: _run(groups, layout, kernel_size)


def _bytes(layout):
    def run(groups):
        kernel_size, rows = 4, 2
        comm.comm_stats(reset=True)
        _run(groups, layout, kernel_size)
        stats = comm.comm_stats(reset=True)
        w, r = groups.sp_size, groups.sp_rank
        neighbours = int(r > 0) + int(r < w - 1)          # contiguous: recv from r-1, send to r+1
        messages = neighbours * (2 if layout == "zigzag" else 1)
        per_message = rows * (kernel_size - 1) * CHANNELS * 8
        assert stats["comm_bytes_conv"] == 2 * messages * per_message, stats   # forward + backward
    return run


def _rejects_wide_kernel(groups):
    positions = packed_positions(1, 2 * groups.sp_size, [[50]])
    local, placement = shard_batch({"position_ids": positions}, groups.sp_rank, groups.sp_size, "contiguous",
                                   groups=groups)
    with pytest.raises(ValueError, match="exceeds the chunk size"):
        sp_short_conv_halo(torch.zeros(1, 2, 1), 4, placement)


CASES = {f"{layout}_k{k}": _case(layout, k) for layout in ("contiguous", "zigzag") for k in (2, 4)}
CASES.update({f"{layout}_bytes": _bytes(layout) for layout in ("contiguous", "zigzag")})
CASES.update({f"short_convolution_module_{layout}": _module(layout) for layout in ("contiguous", "zigzag")})
CASES["rejects_kernel_wider_than_chunk"] = _rejects_wide_kernel
