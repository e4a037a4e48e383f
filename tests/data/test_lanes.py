"""The lane order: keyed permutations, the epoch mixture, lane packing, and per-rank memory that follows the share."""
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest

from lctrain.data.corpus import TrainSlots
from lctrain.data.lanes import LaneOrder, Mixture, SplitSlots, build_segment
from lctrain.data.loader import TrainLoader
from lctrain.data.packing import PackedStream
from lctrain.data.permute import permuted
from lctrain.data.token_store import TokenSplit

BOS, EOS = 2, 3


def split_of(lengths):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = (np.arange(int(offsets[-1])) % 250 + 4).astype(np.uint16)
    return TokenSplit(tokens, offsets)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 1025])
def test_permuted_is_a_bijection_fixed_by_its_key_and_computed_per_index(n):
    everything = permuted(np.arange(n), n, 7)
    assert sorted(everything.tolist()) == list(range(n))
    some = np.arange(n)[::3]
    assert np.array_equal(permuted(some, n, 7), everything[::3])  # any subset, same values
    if n >= 17:
        assert not np.array_equal(everything, permuted(np.arange(n), n, 8))
        assert not np.array_equal(everything, np.arange(n))


def picks(slots, weights, seed, epoch):
    mixture = Mixture([SplitSlots(s) for s in slots], weights, seed)
    return mixture.at(epoch, np.arange(mixture.size))


def test_single_source_epoch_is_one_pass_in_a_new_order_each_epoch():
    split = split_of(np.arange(2, 52))
    orders = []
    for epoch in range(3):
        sources, slots = picks([split], [1.0], 3, epoch)
        assert (sources == 0).all() and sorted(slots.tolist()) == list(range(50))
        orders.append(slots.tolist())
    assert orders[0] != orders[1] != orders[2]
    assert picks([split], [1.0], 4, 1)[1].tolist() != orders[1]


def test_mixture_weights_are_token_shares_with_whole_passes():
    small, large = split_of(np.full(20, 8)), split_of(np.full(300, 18))  # 200 and 6000 tokens with BOS/EOS
    sources, slots = picks([small, large], [1.0, 1.0], 0, 0)
    tokens = [int(((sources == s).sum()) * per) for s, per in ((0, 10), (1, 20))]
    assert abs(tokens[0] - 3100) <= 10 and abs(tokens[1] - 3100) <= 20
    counts = np.bincount(slots[sources == 0], minlength=20)  # 15.5 passes: each document 15 or 16 times
    assert counts.min() >= 15 and counts.max() <= 16
    large_slots = slots[sources == 1]  # downsampled without repeats
    assert len(set(large_slots.tolist())) == len(large_slots) == 155
    assert 0.3 < (sources[: len(sources) // 2] == 0).mean() < 0.9  # interleaved, not concatenated


def test_weights_proportional_to_sizes_use_every_document_once():
    a, b = split_of(np.full(30, 2)), split_of(np.full(10, 4))
    sources, slots = picks([a, b], [120.0, 60.0], 1, 5)
    assert sorted(slots[sources == 0].tolist()) == list(range(30))
    assert sorted(slots[sources == 1].tolist()) == list(range(10))


def test_a_lane_packs_like_packed_stream_and_continues_into_the_next_epoch():
    rng = np.random.default_rng(0)
    masked = split_of(rng.integers(5, 90, size=120))
    masked = SimpleNamespace(tokens=masked.tokens, offsets=masked.offsets,
                             target_mask=rng.random(len(masked.tokens)) < 0.3)  # a synthetic task's answers
    splits = [split_of(rng.integers(1, 40, size=300)), masked]
    seq_len = 16
    order = LaneOrder(splits, [1.0, 2.0], 5, seq_len, BOS, EOS)
    assert order.lanes > 1
    lane = order.lanes - 1
    segments = [build_segment(order.slots, order.mixture, order.lanes, lane, e) for e in (0, 1)]
    # Lane `lane`'s stream: its epoch-0 documents then its epoch-1 documents, packed as one PackedStream.
    stream = PackedStream(splits, np.concatenate([s.source for s in segments]).astype(np.int64),
                          np.concatenate([s.slot for s in segments]).astype(np.int64), seq_len, BOS, EOS)
    crossing = segments[0].tokens // seq_len  # a window that straddles the epoch end
    for i in range(crossing + 3):
        got = order.window(i * order.lanes + lane)
        want = stream._window(i)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[2], want[2])
        assert np.array_equal(got[1][1:] != got[1][:-1], want[1][1:] != want[1][:-1])  # same document breaks
        assert np.array_equal(got[3], want[3])  # loss mask: all of a text document, the answers of a masked one
    assert not all(order.window(i * order.lanes + lane)[3].all() for i in range(crossing))


class FakeEntry:
    """A cached shard entry's arrays (what `TrainSlots` reads): offsets, doc_hash, tokens."""

    def __init__(self, rng, n_docs):
        lengths = rng.integers(20, 200, size=n_docs)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.doc_hash = rng.integers(0, 2**63, size=n_docs, dtype=np.uint64)
        self.tokens = np.zeros(int(self.offsets[-1]), dtype=np.uint16)  # untouched pages cost nothing

    def __len__(self):
        return len(self.offsets) - 1


def loader_memory(entries, world):
    """(order-array bytes, all bytes traced) that rank 0 of `world` holds after reading every lane it owns."""
    tracemalloc.start()
    try:
        slots = TrainSlots(entries, 0.05)
        loader = TrainLoader([slots], [1.0], 512, 4, 0, 0, world, BOS, EOS, "x")
        loader.order.prefetch = False
        for _ in range(-(-loader.order.lanes // (4 * world))):  # rank 0 takes 4 of its L / world lanes a step
            next(loader)
        assert len(loader.order.held_lanes()) == loader.order.lanes // world
        return loader.order.held_bytes(), tracemalloc.get_traced_memory()[0], loader.order.lanes
    finally:
        tracemalloc.stop()


def test_per_rank_loader_memory_follows_the_rank_share():
    """Rank 0 of 4 holds a quarter of what a single process holds, and twice the documents double it: nothing
    on a rank grows with the documents other ranks read (measured with tracemalloc, not just array sizes)."""
    rng = np.random.default_rng(0)
    corpus = [FakeEntry(rng, 4000) for _ in range(20)]  # 80K documents
    half = corpus[:10]
    loader_memory(corpus[:1], 1)  # lazy imports (numpy submodules) happen outside the measurement
    held = {(n, w): loader_memory(entries, w) for n, entries in (("N", half), ("2N", corpus)) for w in (1, 4)}
    assert all(lanes == 256 for _, _, lanes in held.values())
    for n in ("N", "2N"):
        arrays_1, traced_1, _ = held[n, 1]
        arrays_4, traced_4, _ = held[n, 4]
        assert 3.6 <= arrays_1 / arrays_4 <= 4.4, (n, arrays_1, arrays_4)
        assert 3.0 <= traced_1 / traced_4 <= 4.4, (n, traced_1, traced_4)
    for w in (1, 4):
        assert 1.8 <= held["2N", w][0] / held["N", w][0] <= 2.2
    docs = sum(len(e) for e in corpus)
    assert held["2N", 1][0] / docs <= 15  # 14 bytes a document of the epoch held (2 + 4 + 8)
    assert held["2N", 4][1] / docs <= 6  # everything rank 0 of 4 holds: its quarter plus per-entry numbers


@pytest.mark.parametrize("fraction, max_documents", [(0.2, 0), (1e-9, 0), (0.999999, 0), (0.3, 150)])
def test_train_slots_split_like_split_entries(fraction, max_documents):
    """`TrainSlots` (per-entry numbers) holds the same training and held-out documents as `split_entries` (per-document
    arrays), with the fallbacks that keep both sides non-empty and a `max_documents` cut inside an entry."""
    from lctrain.data.corpus import split_entries

    rng = np.random.default_rng(1)
    entries = [FakeEntry(rng, n) for n in (40, 1, 0, 90, 60)]
    for entry in entries:
        entry.tokens = (np.arange(len(entry.tokens)) % 300).astype(np.uint16)
    train, held = split_entries(entries, fraction, max_documents)
    slots = TrainSlots(entries, fraction, max_documents)
    assert len(slots) == len(train) and slots.n_slots == len(train) + len(held)
    assert slots.train_tokens == int(train.offsets[-1])
    assert all(np.array_equal(slots.document(i), train.document(i)) for i in range(len(train)))
    mine = slots.held_out_split()
    assert len(mine) == len(held) >= 1
    assert all(np.array_equal(mine.document(i), held.document(i)) for i in range(len(held)))
