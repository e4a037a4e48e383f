"""A source's tokenised documents, seen through its shard entries without copying them.

`ShardedSplit` is the `TokenSplit` interface (`offsets`, `tokens[a:b]` within one document, `document(i)`,
`lengths()`, `len`) over a selection of documents from several memory-mapped shard entries: `offsets` are
positions in the virtual concatenation of the selected documents, and slicing maps back to the entry holding
the document. Per selected document it keeps 20 bytes (offset, entry, start in the entry).

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
