"""The lane order: keyed permutations, the epoch mixture, lane packing, and per-rank memory that follows the share."""
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest

from lctrain.data.corpus import TrainSlots
from lctrain.config import ConfigError
from lctrain.data.lanes import LaneOrder, Mixture, SplitSlots, build_segment, rank_windows, smooth_count
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
    """(order-array bytes, all bytes traced, lanes) that rank 0 of `world` holds after reading every lane it owns."""
    tracemalloc.start()
    try:
        slots = TrainSlots(entries, 0.05)
        loader = TrainLoader([slots], [1.0], 512, 4, 0, 0, world, BOS, EOS, "x")
        loader.order.prefetch = False
        for _ in range(-(-loader.order.lanes // (4 * world))):  # the first L windows: every lane once
            next(loader)
        lanes, held = loader.order.lanes, len(loader.order.held_lanes())
        own, shared = divmod(lanes, world)
        assert held == own if not shared else own <= held <= own + shared
        return loader.order.held_bytes(), tracemalloc.get_traced_memory()[0], loader.order.lanes
    finally:
        tracemalloc.stop()


def test_per_rank_loader_memory_follows_the_rank_share():
    """Rank 0 of W holds 1/W of what a single process holds, for W = 2, 3, 4, 6 and 24 (3 nodes of 8; these
    divide the 120 lanes) and 7 (17 own lanes, 1 shared), and twice the documents double it: nothing on a rank
    grows with the documents other ranks read (measured with tracemalloc, not just array sizes). Margins: order
    arrays within 10% of 1/W (lanes differ by a document or two; W = 7 may add its shared lane, 1/18 more);
    everything traced within 10% above 1/W and at most 25% below (the per-entry numbers every rank holds)."""
    rng = np.random.default_rng(0)
    corpus = [FakeEntry(rng, 4000) for _ in range(20)]  # 80K documents
    half = corpus[:10]
    loader_memory(corpus[:1], 1)  # lazy imports (numpy submodules) happen outside the measurement
    held = {("N", w): loader_memory(half, w) for w in (1, 4)}
    held.update({("2N", w): loader_memory(corpus, w) for w in (1, 2, 3, 4, 6, 7, 24)})
    assert {key: lanes for key, (_, _, lanes) in held.items() if key[1] == 1} == {("N", 1): 60, ("2N", 1): 120}
    for (n, w), (arrays, traced, _) in held.items():
        arrays_1, traced_1, _ = held[n, 1]
        assert 0.9 * w <= arrays_1 / arrays <= 1.1 * w, (n, w, arrays_1, arrays)
        assert 0.75 * w <= traced_1 / traced <= 1.1 * w, (n, w, traced_1, traced)
    for w in (1, 4):
        assert 1.8 <= held["2N", w][0] / held["N", w][0] <= 2.2
    docs = sum(len(e) for e in corpus)
    assert held["2N", 1][0] / docs <= 15  # 14 bytes a document of the epoch held (2 + 4 + 8)
    assert held["2N", 4][1] / docs <= 6  # everything rank 0 of 4 holds: its quarter plus per-entry numbers


def test_lane_count_is_smooth_so_usual_world_sizes_divide_it():
    assert [smooth_count(n) for n in (1, 2, 3, 5, 8, 14, 15, 29, 30, 256, 3839, 3840, 10**6)] == \
        [1, 2, 3, 3, 6, 12, 15, 15, 30, 240, 1920, 3840, 15 << 16]
    assert all(3840 % w == 0 for w in (2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 40, 48, 64, 96, 128, 256, 384, 960))


@pytest.mark.parametrize("lanes", [15, 240, 256])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 7, 24, 96])
def test_rank_windows_split_each_step_and_keep_a_rank_on_its_share_of_lanes(lanes, world):
    """Each step's windows [p, p + W B) go B to every rank, from any position (a resume from another W); a rank
    reads only its L // W own lanes when W divides L, and at most L // W + L mod W otherwise."""
    for per_rank in (1, 4):
        step = world * per_rank
        for start in (0, 1, step - 1, 12345):
            touched = [set() for _ in range(world)]
            for position in range(start, start + 2 * lanes + 2 * step, step):
                got = [rank_windows(lanes, position, world, per_rank, r) for r in range(world)]
                assert all(len(g) == per_rank and np.all(np.diff(g) > 0) for g in got)
                assert np.array_equal(np.sort(np.concatenate(got)), np.arange(position, position + step))
                for r, g in enumerate(got):
                    touched[r].update((g % lanes).tolist())
            most = max(len(t) for t in touched)
            if lanes % world == 0:
                assert most == lanes // world
            else:
                assert most <= lanes // world + lanes % world
    if lanes % world == 0:  # the plain interleave p + r + j W of a group that started at 0
        assert rank_windows(lanes, 8 * world, world, 4, world - 1).tolist() == \
            [9 * world - 1 + j * world for j in range(4)]


def test_elastic_resume_from_three_ranks_to_two_continues_the_single_process_sequence():
    """The windows a group delivers, in global order, are the single process's sequence, across a resume from
    W = 3 to W = 2 at a position W = 2 would never reach on its own; L = 15, so W = 2 also uses the shared lane."""
    rng = np.random.default_rng(3)
    splits = [split_of(rng.integers(5, 45, size=150)), split_of(rng.integers(5, 20, size=60))]

    def group(world, micro):
        return [TrainLoader(splits, [1.0, 1.0], 16, micro, 9, r, world, BOS, EOS, "f") for r in range(world)]

    def run(loaders, steps):
        rows = {}
        for _ in range(steps):
            for loader in loaders:
                ids = loader.step_windows()
                for w, row in zip(ids, next(loader)["input_ids"].tolist()):
                    rows[int(w)] = row
        return rows

    single = TrainLoader(splits, [1.0, 1.0], 16, 1, 9, 0, 1, BOS, EOS, "f")
    assert single.order.lanes == 15
    want = [next(single)["input_ids"][0].tolist() for _ in range(3 * 2 * 7 + 2 * 3 * 90)]
    three = group(3, 2)
    got = run(three, 7)  # 42 windows
    state = three[1].state_dict()
    assert all(loader.state_dict() == state for loader in three) and state["position"] == 42
    two = group(2, 3)
    for loader in two:
        loader.load_state_dict(state)
    got.update(run(two, 90))
    assert sorted(got) == list(range(len(want)))
    assert [got[w] for w in sorted(got)] == want
    assert single.order.windows_per_epoch < len(want)  # the lanes crossed into epoch 1 on the way


def test_a_state_from_another_lane_count_is_refused():
    loader = TrainLoader([split_of(np.full(400, 20))], [1.0], 16, 1, 0, 0, 1, BOS, EOS, "f")
    state = dict(loader.state_dict(), lanes=256)
    with pytest.raises(ConfigError, match=r"^checkpoint\.resume: the data loader state orders data in 256 lanes"):
        loader.load_state_dict(state)


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
