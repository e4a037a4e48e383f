"""Planned peak memory vs the peak measured by torch's MemTracker over a real fp32 training step on CPU."""
import pytest

from lctrain.config import load_config
from lctrain.plan.candidate import Candidate, Workload
from lctrain.plan.memory import memory_breakdown
from lctrain.plan.shape import model_shape
from tests.plan.measure import measured_peak_bytes
from tests.plan.memory_cases import CONFIGS


def planned_peak_bytes(overrides, rows, seq_len) -> int:
    cfg = load_config(None, overrides + [f"data.seq_len={seq_len}"])
    cand = Candidate(world=1, sp=1, attn="allgather", layout="contiguous", engine="ddp",
                     activation_checkpointing=cfg.model.activation_checkpointing, micro_batch_size=rows)
    work = Workload(seq_len=seq_len, tokens_per_step=rows * seq_len, dtype_bytes=4, backend="torch",
                    mixed_precision=False)
    return memory_breakdown(model_shape(cfg), cand, work)["peak_tensor_bytes"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_planned_peak_within_25_percent_of_measured(name):
    overrides, rows, seq_len, doc_len = CONFIGS[name]
    measured = measured_peak_bytes(overrides, rows, seq_len, doc_len)
    planned = planned_peak_bytes(overrides, rows, seq_len)
    assert 0.75 <= planned / measured <= 1.25, (name, planned / 2**20, measured / 2**20)


@pytest.mark.slow  # measures the two hybrid configurations again; each is already checked above
def test_checkpointing_moves_the_measurement_the_way_the_plan_says():
    """The plan's direction is right, not only its size: checkpointing saves by a similar ratio."""
    overrides, rows, seq_len, doc_len = CONFIGS["hybrid_3to1"]
    plain = planned_peak_bytes(overrides, rows, seq_len)
    ckpt = planned_peak_bytes(overrides + ["model.activation_checkpointing=true"], rows, seq_len)
    measured_plain = measured_peak_bytes(overrides, rows, seq_len, doc_len)
    measured_ckpt = measured_peak_bytes(overrides + ["model.activation_checkpointing=true"], rows, seq_len, doc_len)
    assert ckpt < plain / 2 and measured_ckpt < measured_plain / 2
    assert abs((ckpt / plain) / (measured_ckpt / measured_plain) - 1) < 0.25


@pytest.mark.parametrize("mode", ("allgather", "ring", "ulysses"))
@pytest.mark.parametrize("rows, length, heads, kv_heads, dim", [(2, 768, 4, 2, 16), (1, 2048, 8, 2, 32)])
def test_sp_attention_memory_matches_measurement(mode, rows, length, heads, kv_heads, dim):
    """The fused SP attention (one forward + backward under MemTracker, single-process placement): what it keeps
    for backward is the planner's per-mode activation terms exactly, and its backward needs the planned
    accumulators and communication buffers plus no more than a few `[H, 128, 512]` fp32 tiles of the CPU kernel's
    scratch — nowhere near a `[H, T, T]` block (16x the bound at T = 2048)."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from lctrain.kernels.attention.blockwise import K_BLOCK, Q_BLOCK
    from lctrain.parallel import shard_batch, sp_attention
    from lctrain.plan.memory import sp_attention_working_bytes
    from lctrain.plan.shape import LayerShape
    torch.manual_seed(0)
    q = torch.randn(rows, length, heads, dim, requires_grad=True)
    k, v = (torch.randn(rows, length, kv_heads, dim, requires_grad=True) for _ in range(2))
    grad = torch.randn(rows, length, heads, dim)
    _, placement = shard_batch({"position_ids": torch.arange(length).expand(rows, length)}, 0, 1, "contiguous",
                               attention_mode=mode)
    tracker = MemTracker()
    tracker.track_external(q, k, v, grad)
    with tracker:
        out = sp_attention(q, k, v, placement, mode)
        forward = sum(d["Total"] for d in tracker.get_tracker_snapshot("current").values())
        (out * grad).sum().backward()
    peak = sum(d["Total"] for d in tracker.get_tracker_snapshot("peak").values())
    inputs = sum(t.numel() * 4 for t in (q, k, v, grad))
    o, kv = q.numel() * 4, (k.numel() + v.numel()) * 4
    lse = rows * heads * length * 4
    # kept: output + lse; allgather also the gathered K/V; ulysses its own q, k, v and output copies
    kept = {"allgather": o + lse + kv, "ring": o + lse, "ulysses": 2 * o + lse + o + kv}[mode]
    assert forward - inputs == kept
    layer = LayerShape("attn", 0, heads=heads, kv_heads=kv_heads, head_dim=dim)
    planned = sp_attention_working_bytes(layer, rows, length, 1, mode, 4)
    tile = heads * Q_BLOCK * min(K_BLOCK, length) * 4
    assert planned <= peak - forward <= planned + 4 * tile, (planned, peak - forward, tile)
