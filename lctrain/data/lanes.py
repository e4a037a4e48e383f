"""The training order as L independent packed lanes, so that a rank computes and holds only what it reads.

Epoch e is a sequence of M document *slots* (the mixture below). Slot position m belongs to lane m % L; each lane
packs its documents of epoch 0, then of epoch 1, ... into one endless stream (`[BOS] doc [EOS]`, windows of
`seq_len + 1` tokens sharing one token, exactly as `packing.PackedStream` does, but never cut at an epoch end).
Global window w is window w // L of lane w % L. Everything is a pure function of (seed, w): the order does not
depend on the number of ranks, so a checkpoint's global position resumes on any world size.

Why lanes: a step of a data-parallel group of W ranks consumes the next W * B global windows, B on each rank,
and `rank_windows` hands each rank the windows of *its* lanes. With W dividing L, rank r owns the lanes congruent
to r modulo W, so it builds and holds exactly 1 / W of the order arrays (14 bytes per document of its lanes for the
current epoch, twice that while the next one is ready). L is a product of a power of two and 15 (or 3), e.g. 240,
960 or 3840, so that the usual cluster sizes (2^a times 1, 3, 5 or 15: 3, 6, 10, 12, 24, 48, 96, 384...) divide it;
a power of two alone would leave 3 nodes of 8 GPUs reading every lane. Any other W owns the first
L - (L mod W) lanes the same way (q = L // W each) and shares the last L mod W < W lanes, which fill the steps
where a rank's own lanes come up short; such a rank holds at most q + (L mod W) lanes, not L. The order itself is
never a function of W, only which rank reads which of a step's windows. L is the largest such number <=
min(3840, max(M / 512, min(M, 16)), tokens per epoch / (16 (seq_len + 1))): a lane holds whole documents, not
crumbs, and enough of them that its fixed cost (about 1 KiB) is small against them. L is fixed by the data and
seq_len (part of the loader fingerprint, and saved in the state).

Mixture (one epoch; weights are shares of tokens): with T_s the training tokens of source s (BOS/EOS counted) and
T their sum, source s gets budget_s = T * w_s / sum(w) tokens, i.e. count_s = budget_s * n_s / T_s of its n_s
slots (its documents' average). Slot i of those is slot `pi_{e,s,i // n_s}(i % n_s)`: whole passes of keyed
permutations, so an upsampled source repeats no document before all were used, a downsampled one gives a
different subset each epoch. With one source, or weights proportional to sizes, an epoch is exactly one pass.
Epoch position m holds the `pi_{e,mix}(m)`-th of the sources' picks laid end to end (the sources shuffled
together). Permutations are `permute.permuted`, evaluated per position. A source's slots may include held-out
documents (cached sources keep the held-out ones in place, see `corpus.TrainSlots`); they are empty and skipped.

The next epoch's part of a lane is built by a background thread once the lane is half-way through the current
one (or 64 windows before its end, whichever comes first), so crossing an epoch boundary costs no synchronous
work (and it is O(M / L) per lane if it ever must).
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import numpy as np

from lctrain.config import ConfigError
from lctrain.data.permute import permuted
from lctrain.data.sampling import combine_key

MAX_LANES = 3840  # 15 * 2^8
_MIX_TAG = 0x4D49_58  # the cross-source shuffle
_MIN_WINDOWS_PER_LANE = 16  # per epoch on average: a lane holds whole documents, not crumbs
_MIN_SLOTS_PER_LANE = 512  # a lane's fixed cost (about 1 KiB: objects, array headers) stays small per document
_SMALL_LANES = 16  # ... except that a small corpus (where memory is no issue) still gets a few lanes
_PREFETCH_WINDOWS = 64  # start building a lane's next epoch this many windows (or half an epoch) before its end


class SplitSlots:
    """The slot interface over an in-memory split (`offsets`, `tokens`, optional `target_mask`): every document is
    a training slot."""

    def __init__(self, split):
        self.split = split
        self.offsets = np.asarray(split.offsets)
        self.n_slots = self.n_train = len(self.offsets) - 1
        self.masked = getattr(split, "target_mask", None) is not None
        self.train_tokens = int(self.offsets[-1] - self.offsets[0])

    def lengths(self, slots: np.ndarray) -> np.ndarray:
        """int64 body tokens of each slot (-1 would mark a held-out slot; none here)."""
        return (self.offsets[slots + 1] - self.offsets[slots]).astype(np.int64)

    def body(self, slot: int, lo: int, hi: int) -> np.ndarray:
        start = int(self.offsets[slot])
        return self.split.tokens[start + lo:start + hi]

    def trained(self, slot: int, lo: int, hi: int) -> np.ndarray:
        """bool: which body tokens lo:hi may be loss targets (only when `masked`)."""
        start = int(self.offsets[slot])
        return self.split.target_mask[start + lo:start + hi]


def as_slots(split):
    return split if hasattr(split, "n_slots") else SplitSlots(split)


class Mixture:
    """Which (source, slot) sits at each position of an epoch (see the module docstring)."""

    def __init__(self, slots: list, weights: list[float], seed: int):
        self.seed = seed
        self.n_slots = [s.n_slots for s in slots]
        tokens = [s.train_tokens + 2 * s.n_train for s in slots]  # + BOS + EOS
        total, weight_sum = sum(tokens), float(sum(weights))
        counts = []
        for n, t, w in zip(self.n_slots, tokens, weights):
            budget = max(1, round(total * w / weight_sum))
            counts.append(max(1, round(budget * n / t)) if t else 0)
        self.counts = counts
        self.cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.size = int(self.cum[-1])
        self.epoch_tokens = int(sum(c * t / n for c, t, n in zip(counts, tokens, self.n_slots) if n))

    def at(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source int64, slot int64) at `positions` (int64, in [0, size)) of `epoch`."""
        picks = permuted(positions, self.size, combine_key(self.seed, epoch, _MIX_TAG))
        source = np.searchsorted(self.cum, picks, side="right") - 1
        index = picks - self.cum[source]
        slot = np.empty(len(positions), dtype=np.int64)
        for s, n in enumerate(self.n_slots):
            chosen = np.flatnonzero(source == s)
            if not len(chosen):
                continue
            passes, within = np.divmod(index[chosen], n)
            for p in np.unique(passes):
                here = passes == p
                slot[chosen[here]] = permuted(within[here], n, combine_key(self.seed, epoch, s, int(p)))
        return source, slot


def smooth_count(limit: int) -> int:
    """The largest 15 * 2^a (3 * 2^a below 15, 2^a below 3) <= `limit`: always more than limit / 2."""
    limit = max(1, limit)
    base = 15 if limit >= 15 else 3 if limit >= 3 else 1
    return base << ((limit // base).bit_length() - 1)


def lane_count(mixture: Mixture, seq_len: int) -> int:
    by_slots = max(mixture.size // _MIN_SLOTS_PER_LANE, min(mixture.size, _SMALL_LANES))
    limit = min(MAX_LANES, by_slots, mixture.epoch_tokens // (_MIN_WINDOWS_PER_LANE * (seq_len + 1)))
    return smooth_count(limit)


def rank_windows(lanes: int, position: int, dp_size: int, per_rank: int, dp_rank: int) -> np.ndarray:
    """The global windows (int64, ascending) rank `dp_rank` of `dp_size` reads in the step that consumes windows
    [position, position + dp_size * per_rank) (see the module docstring).

    Lanes below L - (L mod W) are owned, lane l by rank l mod W. The step's windows lie in consecutive lanes
    (cyclically); skipping the shared ones, their owners run through 0..W-1 cyclically too, so every rank owns
    at most per_rank of them. The windows in shared lanes make up the shortfalls, in rank order."""
    windows = np.arange(position, position + dp_size * per_rank, dtype=np.int64)
    lane = windows % lanes
    owned = lane < lanes - lanes % dp_size
    owner = lane % dp_size
    mine = windows[owned & (owner == dp_rank)]
    if len(mine) < per_rank:
        short = per_rank - np.bincount(owner[owned], minlength=dp_size)
        start = int(short[:dp_rank].sum())
        mine = np.sort(np.concatenate([mine, windows[~owned][start:start + int(short[dp_rank])]]))
    return mine


class Segment:
    """One lane's documents of one epoch: source int16, slot, and stream offsets relative to the segment start."""

    def __init__(self, epoch: int, source: np.ndarray, slot: np.ndarray, lengths: np.ndarray):
        self.epoch = epoch
        self.source = source.astype(np.int16)
        small = len(slot) == 0 or int(slot.max()) < 1 << 31
        self.slot = slot.astype(np.int32 if small else np.int64)
        self.starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths + 2, out=self.starts[1:])  # + BOS + EOS

    @property
    def tokens(self) -> int:
        return int(self.starts[-1])

    @property
    def nbytes(self) -> int:
        return self.source.nbytes + self.slot.nbytes + self.starts.nbytes


def build_segment(slots: list, mixture: Mixture, lanes: int, lane: int, epoch: int) -> Segment:
    """Lane `lane`'s documents of `epoch`: O(M / lanes) time and memory."""
    positions = np.arange(lane, mixture.size, lanes, dtype=np.int64)
    source, slot = mixture.at(epoch, positions)
    lengths = np.empty(len(slot), dtype=np.int64)
    for s, split in enumerate(slots):
        chosen = source == s
        if chosen.any():
            lengths[chosen] = split.lengths(slot[chosen])
    kept = lengths >= 0  # held-out slots are empty
    return Segment(epoch, source[kept], slot[kept], lengths[kept])


class Background:
    """A thread running submitted builds in order (the next epochs' segments). It lives only while there is work
    and is not a daemon: a build in flight finishes before the interpreter exits (a daemon thread inside numpy at
    exit can abort the process), while builds not yet begun are dropped once the main thread has ended."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread = None

    def submit(self, fn) -> Future:
        future: Future = Future()
        with self._lock:
            self._queue.put((fn, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lane-prefetch")
                self._thread.start()
        return future

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._queue.empty() or not threading.main_thread().is_alive():
                    self._thread = None
                    return
                fn, future = self._queue.get_nowait()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as err:  # handed to the consumer, which re-raises it
                    future.set_exception(err)


class Lane:
    """Lane `index`: an endless packed stream over its documents of epochs 0, 1, 2, ..."""

    def __init__(self, order: "LaneOrder", index: int):
        self.order, self.index = order, index
        self.totals: list[int] = []  # tokens of epochs 0..len-1 (plain ints: 8 bytes an epoch)
        self.segments: dict[int, Segment] = {}
        self.pending: dict[int, Future] = {}
        self.built = 0  # documents placed by synchronous builds (prefetched ones are not counted)

    def _build(self, epoch: int) -> Segment:
        return build_segment(self.order.slots, self.order.mixture, self.order.lanes, self.index, epoch)

    def segment(self, epoch: int) -> Segment:
        if epoch not in self.segments:
            future = self.pending.pop(epoch, None)
            if future is not None:
                segment = future.result()
            else:
                segment = self._build(epoch)
                self.built += len(segment.slot)
            self.segments[epoch] = segment
            self._note_total(epoch, segment.tokens)
        return self.segments[epoch]

    def _note_total(self, epoch: int, tokens: int) -> None:
        if epoch == len(self.totals):
            self.totals.append(tokens)

    def _start(self, epoch: int) -> int:
        """Stream offset of `epoch`'s first token (building, and dropping, the epochs before it if needed)."""
        while len(self.totals) < epoch:
            e = len(self.totals)
            tokens = self.segments[e].tokens if e in self.segments else self._build(e).tokens
            self._note_total(e, tokens)
        return sum(self.totals[:epoch])

    def _epoch_at(self, offset: int) -> int:
        epoch, start = 0, 0
        while True:
            if epoch == len(self.totals):
                self.segment(epoch)
            if offset < start + self.totals[epoch]:
                return epoch
            start += self.totals[epoch]
            epoch += 1
            if epoch > 1_000_000:
                raise RuntimeError(f"lane {self.index}: no document in a million epochs")

    def _keep(self, epochs: set[int]) -> None:
        for e in [e for e in self.segments if e not in epochs]:
            del self.segments[e]
        for e in [e for e in self.pending if e not in epochs]:
            self.pending.pop(e).cancel()

    def pieces(self, begin: int, end: int):
        """(segment, m, first, last) for every document overlapping stream tokens [begin, end): tokens
        first:last of `[BOS] doc [EOS]` of document m of the segment."""
        epoch = self._epoch_at(begin)
        start = self._start(epoch)
        self._keep({epoch, epoch + 1})
        segment = self.segment(epoch)
        left = segment.tokens - (begin - start)
        if self.order.prefetch and left <= max(segment.tokens // 2, _PREFETCH_WINDOWS * self.order.seq_len) \
                and epoch + 1 not in self.segments and epoch + 1 not in self.pending:
            self.pending[epoch + 1] = self.order.background.submit(lambda e=epoch + 1: self._build(e))
        m = int(np.searchsorted(segment.starts, begin - start, side="right")) - 1
        while True:
            while m < len(segment.slot) and start + int(segment.starts[m]) < end:
                doc_start, doc_end = start + int(segment.starts[m]), start + int(segment.starts[m + 1])
                yield segment, m, max(begin, doc_start) - doc_start, min(end, doc_end) - doc_start
                m += 1
            if start + segment.tokens >= end:
                return
            start += segment.tokens
            epoch += 1
            segment, m = self.segment(epoch), 0


class LaneOrder:
    """The data order of one loader: the mixture, the number of lanes, the lanes built so far."""

    def __init__(self, slots: list, weights: list[float], seed: int, seq_len: int, bos_id: int, eos_id: int):
        self.slots = [as_slots(s) for s in slots]
        self.mixture = Mixture(self.slots, weights, seed)
        self.seq_len, self.bos_id, self.eos_id = seq_len, bos_id, eos_id
        if self.mixture.epoch_tokens < seq_len + 1:
            raise ConfigError(f"data.seq_len: {seq_len} needs at least {seq_len + 1} training tokens per epoch; "
                              f"an epoch has {self.mixture.epoch_tokens}: lower it or add data")
        self.lanes = lane_count(self.mixture, seq_len)
        self.windows_per_epoch = self.mixture.epoch_tokens // seq_len  # about: each lane ends its epoch on its own
        self.prefetch = True
        self.background = Background()
        self._lanes: dict[int, Lane] = {}

    def lane(self, index: int) -> Lane:
        if index not in self._lanes:
            self._lanes[index] = Lane(self, index)
        return self._lanes[index]

    def held_lanes(self) -> list[Lane]:
        return list(self._lanes.values())

    def held_bytes(self) -> int:
        """Bytes of order arrays this loader holds now (current and prefetched segments of its lanes)."""
        held = sum(seg.nbytes for lane in self._lanes.values() for seg in lane.segments.values())
        for lane in self._lanes.values():
            held += sum(f.result().nbytes for f in lane.pending.values() if f.done() and not f.cancelled()
                        and f.exception() is None)
        return held

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Global window `index` as (tokens, segment, position, trained), each `[seq_len + 1]` (see packing)."""
        lane = self.lane(index % self.lanes)
        begin = (index // self.lanes) * self.seq_len
        tokens, segments, positions, trained = [], [], [], []
        for piece, (segment, m, first, last) in enumerate(lane.pieces(begin, begin + self.seq_len + 1)):
            split = self.slots[int(segment.source[m])]
            slot = int(segment.slot[m])
            n_body = int(segment.starts[m + 1] - segment.starts[m]) - 2
            lo, hi = max(first - 1, 0), min(last - 1, n_body)
            parts = []
            if first == 0:
                parts.append(np.array([self.bos_id], dtype=np.int64))
            if hi > lo:
                parts.append(np.asarray(split.body(slot, lo, hi), dtype=np.int64))
            if last == n_body + 2:
                parts.append(np.array([self.eos_id], dtype=np.int64))
            piece_tokens = np.concatenate(parts)
            if split.masked:  # BOS and EOS are never trained in a masked document
                flags = np.zeros(last - first, dtype=bool)
                if hi > lo:
                    offset = 1 if first == 0 else 0
                    flags[offset:offset + hi - lo] = split.trained(slot, lo, hi)
            else:
                flags = np.ones(last - first, dtype=bool)
            tokens.append(piece_tokens)
            segments.append(np.full(len(piece_tokens), piece, dtype=np.int64))
            positions.append(np.arange(len(piece_tokens), dtype=np.int64))
            trained.append(flags)
        return np.concatenate(tokens), np.concatenate(segments), np.concatenate(positions), np.concatenate(trained)
