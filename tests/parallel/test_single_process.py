"""Single-process behaviour: no torch.distributed, sp = 1 paths and input validation."""
import pytest
import torch

from lctrain.models.context import cu_seqlens_from_positions
from lctrain.parallel import (comm_stats, init_sp_groups, loss_normalizer, shard_batch, sp_attention,
                              sp_gated_delta_rule, sp_linear_attention, sp_short_conv_halo)
from tests.parallel import reference_ops
from tests.parallel.sharding_helpers import full_doc_ids
from tests.parallel.util import assert_close, packed_positions


def _positions():
    return packed_positions(2, 11, [[4, 3, 20], [2, 20]])


def test_groups_without_distributed():
    grid = init_sp_groups(1)
    assert (grid.world_size, grid.sp_size, grid.dp_size, grid.sp_rank, grid.dp_rank) == (1, 1, 1, 0, 0)
    with pytest.raises(ValueError, match="not initialised"):
        init_sp_groups(2)
    with pytest.raises(ValueError, match="positive int"):
        init_sp_groups(0)


def test_shard_batch_rejects_bad_input():
    batch = {"position_ids": _positions()}
    with pytest.raises(ValueError, match="layout"):
        shard_batch(batch, 0, 2, "striped")
    with pytest.raises(ValueError, match="sp_rank"):
        shard_batch(batch, 2, 2, "zigzag")
    with pytest.raises(ValueError, match="position_ids"):
        shard_batch({"input_ids": torch.zeros(2, 3)}, 0, 1, "zigzag")


def test_sp1_is_identity_and_counts_locally():
    batch = {"position_ids": _positions(), "labels": torch.tensor([[-100] * 3 + [1] * 8, [2] * 11])}
    local, placement = shard_batch(batch, 0, 1, "contiguous")
    assert torch.equal(local["labels"], batch["labels"]) and placement.seq_len == 11
    assert int(loss_normalizer(local["labels"], placement.groups)) == 19
    assert all(v == 0 for v in comm_stats().values())


def test_sp1_ops_match_reference():
    positions = _positions()
    local, placement = shard_batch({"position_ids": positions}, 0, 1, "zigzag")   # 1 rank, 2 chunks
    q, k = torch.randn(2, 12, 2, 3, dtype=torch.float64), torch.randn(2, 12, 2, 3, dtype=torch.float64)
    v = torch.randn(2, 12, 2, 3, dtype=torch.float64)
    g, beta = -torch.rand(2, 12, 2, dtype=torch.float64), torch.rand(2, 12, 2, dtype=torch.float64)
    full_pos = local["position_ids"]
    cu = cu_seqlens_from_positions(full_pos)
    flat = [x.reshape((1, 24) + x.shape[2:]) for x in (q, k, v, g, beta)]
    ref, _ = reference_ops.gated_delta_rule(*flat, cu_seqlens=cu)
    out = sp_gated_delta_rule(q, k, v, g, beta, None, placement, op=reference_ops.gated_delta_rule)
    assert_close(out, ref.reshape(v.shape), "gated delta rule")
    ref, _ = reference_ops.linear_attention(*flat[:3], log_decay=flat[3], cu_seqlens=cu)
    out = sp_linear_attention(q, k, v, g, None, placement, op=reference_ops.linear_attention)
    assert_close(out, ref.reshape(v.shape), "linear attention")
    expected = reference_ops.masked_attention(q, k[:, :, :1], v[:, :, :1], full_doc_ids(full_pos))
    for mode in ("allgather", "ulysses", "ring"):
        assert_close(sp_attention(q, k[:, :, :1], v[:, :, :1], placement, mode), expected, mode)


def test_bad_shapes_are_rejected():
    local, placement = shard_batch({"position_ids": _positions()}, 0, 1, "contiguous")
    x = torch.randn(2, 11, 4, 3)
    with pytest.raises(ValueError, match="mode"):
        sp_attention(x, x, x, placement, "flash")
    with pytest.raises(ValueError, match="kv heads"):
        sp_attention(x, x[:, :, :3], x[:, :, :3], placement, "ring")
    with pytest.raises(ValueError, match="T_local"):
        sp_attention(x[:, :5], x[:, :5], x[:, :5], placement, "ring")
    with pytest.raises(ValueError, match="log_decay"):
        sp_linear_attention(x, x, x, torch.zeros(2, 2), None, placement, op=reference_ops.linear_attention)
    with pytest.raises(ValueError, match="beta"):
        sp_gated_delta_rule(x, x, x, x[..., 0], x[..., :2, 0], None, placement, op=reference_ops.gated_delta_rule)
    with pytest.raises(ValueError, match="kernel_size"):
        sp_short_conv_halo(x[..., 0], 0, placement)
