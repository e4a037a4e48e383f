"""Held-out split and keyed permutations: pure functions of their integer inputs (the mixture: test_lanes)."""
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
