"""`data.batching: per_source`: one source per step, by weight; exact resume; data-parallel sharding."""
from collections import Counter

import pytest
import torch

from lctrain.config import ConfigError
from lctrain.data import build_data
from lctrain.data.source_batches import step_schedule

PAIRS = (2, 4, 7)  # seq_len 32: documents of 30 tokens hold at most 7 pairs


@pytest.fixture
def mqar_cfg(make_cfg, tmp_path):
    """Three MQAR sources whose documents differ in their number of answers (2, 4 or 8 per window)."""
    def make(*overrides, weights=(1, 1, 1)):
        sources = [{"type": "mqar", "num_kv_pairs": n, "task_vocab": 16, "num_examples": 40, "seed": i,
                    "weight": w} for i, (n, w) in enumerate(zip(PAIRS, weights))]
        return make_cfg(sources, "data.batching=per_source", *overrides, cache=tmp_path / "cache")
    return make


def answers_per_row(batch) -> set[int]:
    """The number of loss targets in each row: the source's pair count, since a window holds one document."""
    return set((batch["labels"] != -100).sum(dim=1).tolist())


def test_schedule_cycles_equal_weights_and_keeps_every_prefix_close_to_the_weights():
    assert step_schedule([1, 1, 1], 7) == [0, 1, 2, 0, 1, 2, 0]
    weights = [3.0, 1.0, 0.5]
    chosen = step_schedule(weights, 900)
    for k in range(1, 901):  # smooth round-robin: every prefix within one step of its exact share per source
        counts = Counter(chosen[:k])
        assert all(abs(counts[s] - k * w / sum(weights)) < 1.0 + 1e-9 for s, w in enumerate(weights))


def test_every_batch_comes_from_one_source_in_schedule_order(mqar_cfg):
    data = build_data(mqar_cfg("train.micro_batch_size=4"), 0, 1, progress=False)
    seen = [answers_per_row(next(data.train)) for _ in range(9)]
    assert seen == [{n} for n in PAIRS * 3]


def test_gradient_accumulation_keeps_a_step_on_one_source(mqar_cfg):
    data = build_data(mqar_cfg("train.micro_batch_size=2", weights=(2, 1, 1)), 0, 1, progress=False,
                      batches_per_step=3)
    steps = [[answers_per_row(next(data.train)) for _ in range(3)] for _ in range(4)]
    assert [s[0] for s in steps] == [{PAIRS[i]} for i in step_schedule([2, 1, 1], 4)]
    assert all(micro == step[0] for step in steps for micro in step)


def test_resume_is_exact_and_the_state_carries_over_to_another_data_parallel_layout(mqar_cfg):
    cfg = mqar_cfg("train.micro_batch_size=4")
    first = build_data(cfg, 0, 1, progress=False)
    for _ in range(5):
        next(first.train)
    state = first.train.state_dict()
    expected = [next(first.train) for _ in range(4)]
    again = build_data(cfg, 0, 1, progress=False)
    again.train.load_state_dict(state)
    got = [next(again.train) for _ in range(4)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(expected, got) for k in a)
    # Two ranks with half the micro-batch take together the same windows per step, from the same source.
    halves = [build_data(mqar_cfg("train.micro_batch_size=2"), r, 2, progress=False) for r in (0, 1)]
    for half in halves:
        half.train.load_state_dict(state)
    for batch in expected:
        rows = [next(half.train)["input_ids"] for half in halves]
        assert sorted(map(tuple, torch.cat(rows).tolist())) == sorted(map(tuple, batch["input_ids"].tolist()))


def test_a_state_of_the_other_batching_is_refused_with_a_clear_error(mqar_cfg):
    per_source = build_data(mqar_cfg(), 0, 1, progress=False)
    mixed = build_data(mqar_cfg("data.batching=mixed"), 0, 1, progress=False)
    with pytest.raises(ConfigError, match="data.batching: the checkpoint was trained with mixed"):
        per_source.train.load_state_dict(mixed.train.state_dict())
    with pytest.raises(ConfigError, match="data.batching: the checkpoint was trained with per_source"):
        mixed.train.load_state_dict(per_source.train.state_dict())
