"""Held-out split and epoch mixture: pure functions of their integer inputs."""
import numpy as np
import pytest

from lctrain.data import sampling


@pytest.mark.parametrize("n, fraction", [(2, 0.01), (10, 0.02), (500, 0.1), (1000, 0.5), (3, 0.99)])
def test_eval_mask_is_stable_and_sized(n, fraction):
    mask = sampling.eval_mask(n, fraction)
    assert np.array_equal(mask, sampling.eval_mask(n, fraction))
    assert 1 <= mask.sum() <= n - 1
    if n >= 500:
        assert abs(mask.mean() - fraction) < 0.05
        # Growing the fraction only adds documents to the held-out set.
        assert not (mask & ~sampling.eval_mask(n, fraction * 1.5)).any()


def test_eval_mask_edge_cases():
    assert not sampling.eval_mask(1, 0.5).any()  # a single document is always trained on
    assert not sampling.eval_mask(50, 0.0).any()
    assert sampling.eval_mask(0, 0.1).shape == (0,)


def test_keyed_permutation_is_a_permutation_fixed_by_its_key():
    perm = sampling.keyed_permutation(1000, 7, 1)
    assert sorted(perm.tolist()) == list(range(1000))
    assert np.array_equal(perm, sampling.keyed_permutation(1000, 7, 1))
    assert not np.array_equal(perm, sampling.keyed_permutation(1000, 7, 2))
    assert not np.array_equal(perm, sampling.keyed_permutation(1000, 8, 1))


def test_single_source_epoch_is_one_pass_in_a_new_order_each_epoch():
    lengths = [np.arange(2, 52, dtype=np.int64)]
    orders = []
    for epoch in range(3):
        sources, docs = sampling.epoch_order(lengths, [1.0], seed=3, epoch=epoch)
        assert (sources == 0).all() and sorted(docs.tolist()) == list(range(50))
        orders.append(docs.tolist())
    assert orders[0] != orders[1] != orders[2]
    assert sampling.epoch_order(lengths, [1.0], 3, 1)[1].tolist() == orders[1]
    assert sampling.epoch_order(lengths, [1.0], 4, 1)[1].tolist() != orders[1]


def test_mixture_weights_are_token_shares():
    small = np.full(20, 10, dtype=np.int64)  # 200 tokens
    large = np.full(300, 20, dtype=np.int64)  # 6000 tokens
    sources, docs = sampling.epoch_order([small, large], [1.0, 1.0], seed=0, epoch=0)
    tokens = [int(lengths[docs[sources == s]].sum()) for s, lengths in enumerate([small, large])]
    total = small.sum() + large.sum()
    assert abs(tokens[0] - total / 2) <= 10 and abs(tokens[1] - total / 2) <= 20
    # The small source is upsampled by whole passes: each document 15 or 16 times (3100 / 200 = 15.5 passes).
    counts = np.bincount(docs[sources == 0], minlength=20)
    assert counts.min() >= 15 and counts.max() <= 16
    # The large source is downsampled without repeats.
    large_docs = docs[sources == 1]
    assert len(set(large_docs.tolist())) == len(large_docs) == 155
    # The sources are interleaved, not concatenated.
    assert 0.3 < (sources[: len(sources) // 2] == 0).mean() < 0.9


def test_weights_proportional_to_sizes_use_every_document_once():
    a, b = np.full(30, 4, dtype=np.int64), np.full(10, 6, dtype=np.int64)
    sources, docs = sampling.epoch_order([a, b], [120.0, 60.0], seed=1, epoch=5)
    assert sorted(docs[sources == 0].tolist()) == list(range(30))
    assert sorted(docs[sources == 1].tolist()) == list(range(10))
