"""Packing: an ordered list of documents -> fixed-length training windows that keep document boundaries.

Every document becomes `[BOS] tokens [EOS]`; the documents are laid end to end into one stream, and window `w`
is the `seq_len + 1` stream tokens starting at `w * seq_len` (consecutive windows share one token, so every stream
token except the very first is a prediction target exactly once). From a window:
    input_ids    = window[:-1]                                   int64 [T]
    labels       = window[1:], -100 where the target belongs to another document than the input token (the EOS
                   of one document does not predict the BOS of the next)        int64 [T]
    position_ids = position inside the document, restarting at 0 at every document start *and* at the window
                   start: a document cut by a window boundary continues in the next window as a new sequence,
                   since the model cannot see the previous window                                     int64 [T]
The model recovers the boundaries from `position_ids` (`cu_seqlens_from_positions`); batches also carry that
`cu_seqlens` (int32 over the flattened `B*T` tokens). The tail of the stream too short for a window is dropped.
Nothing is ever padded.
"""
from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


class PackedStream:
    """Documents `doc_ids[m]` of `splits[source_ids[m]]`, m = 0..M-1, as one stream cut into windows.

    splits: per source a `TokenSplit`-like object with `offsets` (int64 `[n+1]`) and `tokens`.
    """

    def __init__(self, splits, source_ids: np.ndarray, doc_ids: np.ndarray, seq_len: int, bos_id: int,
                 eos_id: int):
        self.splits = splits
        self.source_ids = np.asarray(source_ids, dtype=np.int64)
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.seq_len = seq_len
        self.bos_id, self.eos_id = bos_id, eos_id
        lengths = np.zeros(len(self.doc_ids), dtype=np.int64)
        for s, split in enumerate(splits):
            chosen = self.source_ids == s
            lengths[chosen] = np.diff(split.offsets)[self.doc_ids[chosen]] + 2  # + BOS + EOS
        self.starts = np.zeros(len(lengths) + 1, dtype=np.int64)  # stream offset of each document's BOS
        np.cumsum(lengths, out=self.starts[1:])

    @property
    def total_tokens(self) -> int:
        return int(self.starts[-1])

    def __len__(self) -> int:
        """Number of full windows."""
        return max(0, (self.total_tokens - 1) // self.seq_len)

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Window `index` as (tokens, segment, position), each int64 `[seq_len + 1]`.

        segment: the stream's document number of each token; position: as in the module docstring.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        begin = index * self.seq_len
        end = begin + self.seq_len + 1
        tokens, segments, positions = [], [], []
        m = int(np.searchsorted(self.starts, begin, side="right")) - 1
        while m < len(self.doc_ids) and self.starts[m] < end:
            first = max(begin, int(self.starts[m])) - int(self.starts[m])  # local index in [BOS] doc [EOS]
            last = min(end, int(self.starts[m + 1])) - int(self.starts[m])  # exclusive
            piece = self._document_slice(m, first, last)
            tokens.append(piece)
            segments.append(np.full(len(piece), m, dtype=np.int64))
            positions.append(np.arange(len(piece), dtype=np.int64))  # 0 at the doc start or at the window start
            m += 1
        return np.concatenate(tokens), np.concatenate(segments), np.concatenate(positions)

    def _document_slice(self, m: int, first: int, last: int) -> np.ndarray:
        """Tokens `first:last` of document m framed as `[BOS] body [EOS]` (int64)."""
        split = self.splits[self.source_ids[m]]
        doc = int(self.doc_ids[m])
        body_start, body_end = int(split.offsets[doc]), int(split.offsets[doc + 1])
        n_body = body_end - body_start
        parts = []
        if first == 0:
            parts.append(np.array([self.bos_id], dtype=np.int64))
        lo, hi = max(first - 1, 0), min(last - 1, n_body)
        if hi > lo:
            parts.append(np.asarray(split.tokens[body_start + lo:body_start + hi], dtype=np.int64))
        if last == n_body + 2:
            parts.append(np.array([self.eos_id], dtype=np.int64))
        return np.concatenate(parts)

    def example(self, index: int) -> dict[str, np.ndarray]:
        """Window `index` as model inputs: input_ids, labels, position_ids, each int64 `[seq_len]`."""
        tokens, segments, positions = self.window(index)
        labels = tokens[1:].copy()
        labels[segments[1:] != segments[:-1]] = IGNORE_INDEX
        return {"input_ids": tokens[:-1], "labels": labels, "position_ids": positions[:-1]}


def collate(examples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack examples into a batch: input_ids, labels, position_ids int64 `[B, T]`, cu_seqlens int32 `[N+1]`."""
    batch = {key: torch.from_numpy(np.stack([ex[key] for ex in examples])) for key in examples[0]}
    batch["cu_seqlens"] = cu_seqlens(batch["position_ids"])
    return batch


def cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 `[N+1]` sequence offsets over the flattened `[B*T]` tokens: a sequence starts where the position is 0
    (every row starts at 0, since positions restart at each window)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0, as_tuple=False).flatten()
    return torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
