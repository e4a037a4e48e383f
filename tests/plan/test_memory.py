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
