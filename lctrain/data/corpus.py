"""A source's tokenised documents, seen through its shard entries without copying them.

`ShardedSplit` is the `TokenSplit` interface (`offsets`, `tokens[a:b]` within one document, `document(i)`,
`lengths()`, `len`) over a selection of documents from several memory-mapped shard entries: `offsets` are
positions in the virtual concatenation of the selected documents, and slicing maps back to the entry holding
the document. Per selected document it keeps 20 bytes (offset, entry, start in the entry).

`TrainSlots` is what the training loader reads from cached sources: the source's documents as *slots* in shard
order, held-out ones included (they read as empty), so that it keeps only per-entry numbers and looks a
document's length, hash and tokens up in the memory-mapped entry when the order needs it. Its memory does not
grow with the number of documents, so a rank holds only the order arrays of its own lanes (see `lanes`).

Held-out split: a document is held out when the hash of its *text* (salted) falls below `eval_fraction`. It does
not depend on the document's index, so adding or removing shards never moves a document between the splits.
"""
from __future__ import annotations

import numpy as np

from lctrain.data.sampling import SPLIT_SALT, _mix64


class _VirtualTokens:
    def __init__(self, split: "ShardedSplit"):
        self.split = split

    def __getitem__(self, item):
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("ShardedSplit.tokens supports contiguous slices only")
        split = self.split
        start, stop = item.start or 0, item.stop
        if stop is None or stop <= start:
            return np.zeros(0, dtype=split.dtype)
        doc = int(np.searchsorted(split.offsets, start, side="right")) - 1
        if stop > split.offsets[doc + 1]:
            raise IndexError("ShardedSplit.tokens: a slice may not cross a document boundary")
        base = int(split.entry_start[doc]) - int(split.offsets[doc])
        return split.entries[int(split.entry_of[doc])].tokens[base + start:base + stop]

    def __len__(self) -> int:
        return int(self.split.offsets[-1])


class ShardedSplit:
    """Documents `(entry_of[i], local[i])` of `entries`, in that order."""

    def __init__(self, entries: list, entry_of: np.ndarray, local: np.ndarray):
        self.entries = entries
        self.entry_of = np.asarray(entry_of, dtype=np.int32)
        local = np.asarray(local, dtype=np.int64)
        self.entry_start = np.zeros(len(local), dtype=np.int64)
        lengths = np.zeros(len(local), dtype=np.int64)
        for e, entry in enumerate(entries):
            chosen = self.entry_of == e
            if chosen.any():
                offsets = np.asarray(entry.offsets)
                self.entry_start[chosen] = offsets[local[chosen]]
                lengths[chosen] = offsets[local[chosen] + 1] - offsets[local[chosen]]
        self.offsets = np.zeros(len(local) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.dtype = entries[0].tokens.dtype if entries else np.dtype(np.uint16)
        self.tokens = _VirtualTokens(self)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, index: int) -> np.ndarray:
        return self.tokens[int(self.offsets[index]):int(self.offsets[index + 1])]


def held_out(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """bool per document: True where the salted hash of the document's text falls below `fraction`."""
    if fraction <= 0 or len(hashes) == 0:
        return np.zeros(len(hashes), dtype=bool)
    with np.errstate(over="ignore"):
        mixed = _mix64(np.asarray(hashes, dtype=np.uint64) ^ np.uint64(SPLIT_SALT))
    unit = (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return unit < fraction


class TrainSlots:
    """The training documents of a source's entries, addressed by slot (the i-th document in entry order, the
    first `max_documents` when > 0); held-out slots have length -1. Holds O(entries) numbers, computed in one
    streaming pass over the entries' hashes and offsets."""

    masked = False

    def __init__(self, entries: list, eval_fraction: float, max_documents: int = 0):
        self.entries, self.fraction = entries, eval_fraction
        sizes = [len(e) for e in entries]
        if max_documents:
            left = max_documents
            for i, size in enumerate(sizes):
                sizes[i] = min(size, left)
                left -= sizes[i]
        self.entry_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_slots = int(self.entry_start[-1])
        self.forced_eval = self.forced_train = -1  # the fallbacks of `split_entries`, as slots
        n_held, held_tokens = 0, 0
        lowest = highest = None  # (mixed hash, slot)
        for e, entry in enumerate(entries):
            n = sizes[e]
            if not n:
                continue
            mask = held_out(entry.doc_hash[:n], eval_fraction)
            offsets = np.asarray(entry.offsets[:n + 1])
            n_held += int(mask.sum())
            held_tokens += int((np.diff(offsets)[mask]).sum())
            if eval_fraction > 0:
                with np.errstate(over="ignore"):
                    mixed = _mix64(np.asarray(entry.doc_hash[:n], dtype=np.uint64) ^ np.uint64(SPLIT_SALT))
                lo, hi = int(np.argmin(mixed)), int(np.argmax(mixed))
                if lowest is None or mixed[lo] < lowest[0]:
                    lowest = (mixed[lo], int(self.entry_start[e]) + lo)
                if highest is None or mixed[hi] > highest[0]:
                    highest = (mixed[hi], int(self.entry_start[e]) + hi)
        total_tokens = sum(int(entry.offsets[n]) - int(entry.offsets[0]) for entry, n in zip(entries, sizes) if n)
        if eval_fraction > 0 and self.n_slots >= 2:
            if n_held == 0:
                self.forced_eval = lowest[1]
                n_held, held_tokens = 1, self._body_length(self.forced_eval)
            elif n_held == self.n_slots:
                self.forced_train = highest[1]
                n_held, held_tokens = n_held - 1, held_tokens - self._body_length(self.forced_train)
        self.n_train = self.n_slots - n_held
        self.train_tokens = total_tokens - held_tokens
        self._train_index = None

    def _locate(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        entry = np.searchsorted(self.entry_start, slots, side="right") - 1
        return entry, slots - self.entry_start[entry]

    def _body_length(self, slot: int) -> int:
        entry, local = self._locate(np.array([slot]))
        offsets = self.entries[int(entry[0])].offsets
        return int(offsets[int(local[0]) + 1]) - int(offsets[int(local[0])])

    def lengths(self, slots: np.ndarray) -> np.ndarray:
        """int64 body tokens of each slot, -1 for a held-out one."""
        slots = np.asarray(slots, dtype=np.int64)
        entry, local = self._locate(slots)
        out = np.empty(len(slots), dtype=np.int64)
        for e in np.unique(entry):
            chosen = np.flatnonzero(entry == e)
            item = self.entries[int(e)]
            idx = local[chosen]
            lengths = np.asarray(item.offsets[idx + 1], dtype=np.int64) - np.asarray(item.offsets[idx], dtype=np.int64)
            held = held_out(np.asarray(item.doc_hash[idx]), self.fraction)
            held[slots[chosen] == self.forced_eval] = True
            held[slots[chosen] == self.forced_train] = False
            lengths[held] = -1
            out[chosen] = lengths
        return out

    def body(self, slot: int, lo: int, hi: int) -> np.ndarray:
        entry, local = self._locate(np.array([slot]))
        item = self.entries[int(entry[0])]
        start = int(item.offsets[int(local[0])])
        return item.tokens[start + lo:start + hi]

    def held_out_split(self) -> ShardedSplit:
        """The held-out documents as a `ShardedSplit` (O(held-out documents) memory)."""
        entry_of, local = [], []
        for e in range(len(self.entries)):
            slots = np.arange(self.entry_start[e], self.entry_start[e + 1], dtype=np.int64)
            held = np.flatnonzero(self.lengths(slots) < 0)
            entry_of.append(np.full(len(held), e, dtype=np.int32))
            local.append(held.astype(np.int64))
        return ShardedSplit(self.entries, np.concatenate(entry_of) if entry_of else np.zeros(0, np.int32),
                            np.concatenate(local) if local else np.zeros(0, np.int64))

    # inspection (tests, tools): the i-th training document; builds an O(documents) index on first use
    def __len__(self) -> int:
        return self.n_train

    def document(self, index: int) -> np.ndarray:
        if self._train_index is None:
            slots = np.arange(self.n_slots, dtype=np.int64)
            self._train_index = slots[self.lengths(slots) >= 0]
        slot = int(self._train_index[index])
        return self.body(slot, 0, int(self.lengths(np.array([slot]))[0]))


def split_entries(entries: list, eval_fraction: float, max_documents: int = 0,
                  all_eval: bool = False) -> tuple[ShardedSplit, ShardedSplit]:
    """(train, eval) over the entries' documents in order (the first `max_documents` when > 0).

    With `all_eval` every document is evaluation data. Otherwise the split is by content hash; a source of >= 2
    documents whose hashes hold none out (or all) gives up its lowest- (highest-) hashed one, so that a positive
    fraction always yields evaluation data and training data."""
    entry_of, local, hashes = [], [], []
    remaining = max_documents or None
    for e, entry in enumerate(entries):
        n = len(entry) if remaining is None else min(len(entry), remaining)
        entry_of.append(np.full(n, e, dtype=np.int32))
        local.append(np.arange(n, dtype=np.int64))
        hashes.append(np.asarray(entry.doc_hash[:n]))
        if remaining is not None:
            remaining -= n
            if remaining <= 0:
                break
    entry_of = np.concatenate(entry_of) if entry_of else np.zeros(0, dtype=np.int32)
    local = np.concatenate(local) if local else np.zeros(0, dtype=np.int64)
    hashes = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
    if all_eval:
        mask = np.ones(len(local), dtype=bool)
    else:
        mask = held_out(hashes, eval_fraction)
        if eval_fraction > 0 and len(mask) >= 2:
            with np.errstate(over="ignore"):
                order = _mix64(hashes ^ np.uint64(SPLIT_SALT))
            if not mask.any():
                mask[np.argmin(order)] = True
            if mask.all():
                mask[np.argmax(order)] = False
    train = ShardedSplit(entries, entry_of[~mask], local[~mask])
    evaluation = ShardedSplit(entries, entry_of[mask], local[mask])
    return train, evaluation
