"""Distributed cases for groups, sharding, gathering and the loss normaliser."""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.parallel import comm, gather_sequence, init_sp_groups, loss_normalizer, shard_batch
from tests.parallel.sharding_helpers import full_doc_ids
from tests.parallel.util import packed_positions


def _batch(rows: int, length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    positions = packed_positions(rows, length, [[3, 8, 1, 50], [6, 6, 50]])
    labels = torch.randint(0, 50, (rows, length), generator=gen)
    labels[torch.rand(rows, length, generator=gen) < 0.3] = -100
    return {"input_ids": torch.randint(1, 50, (rows, length), generator=gen), "labels": labels,
            "position_ids": positions, "meta": "kept"}


def _roundtrip(layout):
    def run(groups):
        w = groups.sp_size
        for length in (4 * w, 4 * w + 1, 7 * w + 3):                 # divisible and not
            batch = _batch(2, length)
            local, placement = shard_batch(batch, groups.sp_rank, w, layout, groups=groups)
            chunks = w * (2 if layout == "zigzag" else 1)
            padded = -(-length // chunks) * chunks
            assert placement.seq_len == padded and placement.chunk_size == padded // chunks
            assert local["input_ids"].shape == (2, padded // w) and local["meta"] == "kept"
            expected_ids = (groups.sp_rank,) if layout == "contiguous" else (groups.sp_rank, 2 * w - 1 - groups.sp_rank)
            assert placement.chunk_ids == expected_ids
            for key in ("input_ids", "labels", "position_ids"):
                assert torch.equal(gather_sequence(local[key], placement), batch[key]), key
            full = gather_sequence(local["labels"], placement, trim=False)
            assert (full[:, length:] == -100).all(), "padding must be masked from the loss"
            positions = gather_sequence(local["position_ids"], placement, trim=False)
            if padded > length:
                assert (positions[:, length] == 0).all(), "padding starts its own document"
            starts = torch.tensor(placement.chunk_ids) * placement.chunk_size
            assert torch.equal(placement.continues, positions[:, starts] != 0)
            assert torch.equal(placement.doc_ids, full_doc_ids(positions))
            count = loss_normalizer(local["labels"], groups)
            assert int(count) == int((batch["labels"] != -100).sum())
    return run


def _dp_by_sp(groups):
    """World split into DP x SP = (W/2) x 2 (or 2 x 1 for W=2): groups, ranks and the global normaliser."""
    world, rank = groups.world_size, groups.rank
    sp = 2 if world >= 4 else 1
    grid = init_sp_groups(sp)
    assert (grid.sp_size, grid.dp_size, grid.sp_rank, grid.dp_rank) == (sp, world // sp, rank % sp, rank // sp)
    if sp > 1:
        members = [torch.zeros(1, dtype=torch.long) for _ in range(sp)]
        dist.all_gather(members, torch.tensor([rank]), group=grid.sp_group)
        assert [int(m) for m in members] == list(range(grid.dp_rank * sp, (grid.dp_rank + 1) * sp))
    if grid.dp_size > 1:
        members = [torch.zeros(1, dtype=torch.long) for _ in range(grid.dp_size)]
        dist.all_gather(members, torch.tensor([rank]), group=grid.dp_group)
        assert [int(m) for m in members] == list(range(grid.sp_rank, world, sp))
    # every DP group trains on its own sample; the normaliser counts targets over all of them
    batches = [_batch(1, 13, seed=d) for d in range(grid.dp_size)]
    local, _ = shard_batch(batches[grid.dp_rank], grid.sp_rank, sp, "zigzag", groups=grid)
    comm.comm_stats(reset=True)
    count = loss_normalizer(local["labels"], grid)
    assert int(count) == sum(int((b["labels"] != -100).sum()) for b in batches)
    assert comm.comm_stats()["comm_bytes_loss"] == 4 * (world - 1) * 8 // world


CASES = {f"roundtrip_{layout}": _roundtrip(layout) for layout in ("contiguous", "zigzag")}
CASES["dp_by_sp_groups"] = _dp_by_sp


def _inside_dp_by_sp(groups):
    """The SP functions inside SP groups of a DP x SP grid: group ranks map to the right global ranks."""
    from tests.parallel import cases_attention, cases_lasp2
    sp = 2 if groups.world_size >= 4 else 1
    grid = init_sp_groups(sp)
    for mode in ("allgather", "ulysses", "ring"):
        cases_attention._run(grid, mode, "zigzag", 5 * groups.world_size + 3, heads=4, kv_heads=2)
    cases_lasp2._delta(grid, "zigzag", 6 * groups.world_size + 3)
    cases_lasp2._linear(grid, "contiguous", "token", 6 * groups.world_size + 3)


CASES["ops_inside_dp_by_sp_grid"] = _inside_dp_by_sp
