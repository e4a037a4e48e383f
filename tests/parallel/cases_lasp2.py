"""Distributed cases for LASP-2 (`sp_linear_attention`, `sp_gated_delta_rule`) against the full-sequence op."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lctrain.models.context import cu_seqlens_from_positions
from lctrain.parallel import comm, gather_sequence, shard_batch, sp_gated_delta_rule, sp_linear_attention
from tests.parallel.util import all_sum, assert_close, kernel_ops, leaves, packed_positions

HEADS, KEY, VALUE = 2, 3, 4
# documents that cross chunk (and rank) boundaries, a tiny one, and a row whose first token is mid-document
DOCS = [[5, 9, 2, 11, 40], [3, 17, 1, 30]]


def _inputs(length: int, rows: int = 2, start_mid_document: bool = True):
    positions = packed_positions(rows, length, DOCS)
    if start_mid_document:
        positions[1] += 4          # row 1 starts inside a document: no token has position 0 until the next one
        positions[1, 3:] = packed_positions(1, length - 3, [DOCS[1]])[0]
    q = torch.randn(rows, length, HEADS, KEY, dtype=torch.float64)
    k = F.normalize(torch.randn(rows, length, HEADS, KEY, dtype=torch.float64), dim=-1)
    v = torch.randn(rows, length, HEADS, VALUE, dtype=torch.float64)
    return positions, q, k, v


def _flat(x):
    return x.reshape((1, -1) + tuple(x.shape[2:]))


def _linear(groups, layout: str, decay: str, length: int, use_cu: bool = False, backend: str | None = "default"):
    op, _, default_backend = kernel_ops()
    backend = default_backend if backend == "default" else backend
    positions, q, k, v = _inputs(length)
    rows = q.shape[0]
    batch = {"position_ids": positions, "q": q, "k": k, "v": v,
             "grad": torch.randn(rows, length, HEADS, VALUE, dtype=torch.float64)}
    if decay == "token":
        batch["log_decay"] = -torch.rand(rows, length, HEADS, dtype=torch.float64)
    head_decay = -torch.rand(HEADS, dtype=torch.float64) if decay == "head" else None

    # single-process reference on the full sequence
    full = leaves(batch, ["q", "k", "v"] + (["log_decay"] if decay == "token" else []))
    full_head = head_decay.clone().requires_grad_(True) if head_decay is not None else None
    full_decay = _flat(full["log_decay"]) if decay == "token" else full_head
    o_ref, _ = op(_flat(full["q"]), _flat(full["k"]), _flat(full["v"]), log_decay=full_decay,
                  cu_seqlens=cu_seqlens_from_positions(positions), backend=backend)
    o_ref = o_ref.reshape(rows, length, HEADS, VALUE)
    (o_ref * batch["grad"]).sum().backward()

    local, placement = shard_batch(batch, groups.sp_rank, groups.sp_size, layout, groups=groups)
    mine = leaves(local, ["q", "k", "v"] + (["log_decay"] if decay == "token" else []))
    my_head = head_decay.clone().requires_grad_(True) if head_decay is not None else None
    cu = cu_seqlens_from_positions(local["position_ids"]) if use_cu else None
    o = sp_linear_attention(mine["q"], mine["k"], mine["v"], mine.get("log_decay", my_head), None, placement,
                            backend=backend, cu_seqlens=cu, op=op)
    (o * local["grad"]).sum().backward()

    assert_close(gather_sequence(o.detach(), placement), o_ref.detach(), "output")
    for name, leaf in mine.items():
        assert_close(gather_sequence(leaf.grad, placement), full[name].grad, f"d{name}")
    if my_head is not None:
        assert_close(all_sum(my_head.grad), full_head.grad, "d log_decay [H]")
    return placement


def _delta(groups, layout: str, length: int, backend: str | None = "default"):
    _, op, default_backend = kernel_ops()
    backend = default_backend if backend == "default" else backend
    positions, q, k, v = _inputs(length)
    rows = q.shape[0]
    batch = {"position_ids": positions, "q": q, "k": k, "v": v,
             "g": -torch.rand(rows, length, HEADS, dtype=torch.float64) * 0.5,
             "beta": torch.rand(rows, length, HEADS, dtype=torch.float64) * 0.9 + 0.05,
             "grad": torch.randn(rows, length, HEADS, VALUE, dtype=torch.float64)}
    names = ["q", "k", "v", "g", "beta"]
    full = leaves(batch, names)
    o_ref, _ = op(*[_flat(full[n]) for n in names], cu_seqlens=cu_seqlens_from_positions(positions),
                  backend=backend)
    o_ref = o_ref.reshape(rows, length, HEADS, VALUE)
    (o_ref * batch["grad"]).sum().backward()

    local, placement = shard_batch(batch, groups.sp_rank, groups.sp_size, layout, groups=groups)
    mine = leaves(local, names)
    o = sp_gated_delta_rule(*[mine[n] for n in names], placement=placement, backend=backend, op=op)  # mixer style
    (o * local["grad"]).sum().backward()
    assert_close(gather_sequence(o.detach(), placement), o_ref.detach(), "output")
    for name in names:
        assert_close(gather_sequence(mine[name].grad, placement), full[name].grad, f"d{name}")
    return placement


def _length(groups, extra: int = 3) -> int:
    return 6 * groups.sp_size + extra           # never a multiple of the chunk count: exercises padding


def _bytes_do_not_grow(groups, run, per_chunk_elems):
    """Same traffic at two lengths, equal to the analytic AllGather volumes (forward + backward)."""
    volumes = []
    for length in (_length(groups), 2 * _length(groups) + 5):
        comm.comm_stats(reset=True)
        placement = run(length)
        volumes.append(comm.comm_stats(reset=True))
    w, rows, n_local = groups.sp_size, 2, len(placement.chunk_ids)
    state = HEADS * KEY * VALUE
    expected = 2 * (w - 1) * rows * n_local * 8 * (per_chunk_elems + state)   # forward: (A, B) summaries
    expected += 2 * (w - 1) * rows * n_local * 8 * state                     # backward: entering-state grads
    for stats in volumes:
        assert stats["comm_bytes_linear"] == expected, (stats, expected)
        assert stats["comm_calls_linear"] == 2, stats
        assert stats["comm_bytes_attn"] == 0 and stats["comm_bytes_conv"] == 0, stats


CASES = {}
for _layout in ("contiguous", "zigzag"):
    for _decay in ("none", "head", "token"):
        CASES[f"linear_{_layout}_{_decay}"] = (
            lambda g, lay=_layout, dec=_decay: _linear(g, lay, dec, _length(g)))
    CASES[f"delta_{_layout}"] = lambda g, lay=_layout: _delta(g, lay, _length(g))
CASES["linear_local_cu_seqlens"] = lambda g: _linear(g, "zigzag", "token", _length(g), use_cu=True)
CASES["linear_bytes_independent_of_length"] = lambda g: _bytes_do_not_grow(
    g, lambda n: _linear(g, "zigzag", "token", n), HEADS)
CASES["delta_bytes_independent_of_length"] = lambda g: _bytes_do_not_grow(
    g, lambda n: _delta(g, "contiguous", n), HEADS * KEY * KEY)

if kernel_ops()[2] == "naive":
    # the chunked torch kernels (what runs on CPU by default) must compose exactly as well
    CASES["linear_chunked_kernel"] = lambda g: _linear(g, "zigzag", "token", _length(g), backend="torch")
    CASES["delta_chunked_kernel"] = lambda g: _delta(g, "zigzag", _length(g), backend="torch")
