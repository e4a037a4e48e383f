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

Per-token loss mask: a split may carry `target_mask` (bool, one entry per token of `tokens`) saying which of its
tokens are trained as targets; its documents' other targets, BOS and EOS included, get label -100. Synthetic
token-level tasks use it to train only on the answers (MQAR: the value after each query key). Splits without it
(text) train on every target, as above.
"""
from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


class PackedStream:
    """Documents `doc_ids[m]` of `splits[source_ids[m]]`, m = 0..M-1, as one stream cut into windows.

    splits: per source a `TokenSplit`-like object with `offsets` (int64 `[n+1]`) and `tokens`, and optionally
    `target_mask` (bool, same length as `tokens`; see the module docstring).
    """

    def __init__(self, splits, source_ids: np.ndarray, doc_ids: np.ndarray, seq_len: int, bos_id: int,
                 eos_id: int):
        self.splits = splits
        # The narrowest types that fit (14 bytes per document with `starts`, instead of 24).
        self.source_ids = np.asarray(source_ids, dtype=np.int16 if len(splits) < 1 << 15 else np.int64)
        doc_ids = np.asarray(doc_ids)
        small = len(doc_ids) == 0 or int(doc_ids.max()) < 1 << 31
        self.doc_ids = doc_ids.astype(np.int32 if small else np.int64, copy=False)
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
        tokens, segments, positions, _ = self._window(index)
        return tokens, segments, positions

    def _window(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`window(index)` plus trained: bool `[seq_len + 1]`, whether each token may be a loss target."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        begin = index * self.seq_len
        end = begin + self.seq_len + 1
        tokens, segments, positions, trained = [], [], [], []
        m = int(np.searchsorted(self.starts, begin, side="right")) - 1
        while m < len(self.doc_ids) and self.starts[m] < end:
            first = max(begin, int(self.starts[m])) - int(self.starts[m])  # local index in [BOS] doc [EOS]
            last = min(end, int(self.starts[m + 1])) - int(self.starts[m])  # exclusive
            piece = self._document_slice(m, first, last)
            tokens.append(piece)
            segments.append(np.full(len(piece), m, dtype=np.int64))
            positions.append(np.arange(len(piece), dtype=np.int64))  # 0 at the doc start or at the window start
            trained.append(self._trained_slice(m, first, last))
            m += 1
        return np.concatenate(tokens), np.concatenate(segments), np.concatenate(positions), np.concatenate(trained)

    def _body_range(self, m: int, first: int, last: int) -> tuple[object, int, int, int, int]:
        """(split, body_start, n_body, lo, hi): document m's body tokens lo:hi fall in `[BOS] body [EOS]`
        positions `first:last`."""
        split = self.splits[self.source_ids[m]]
        doc = int(self.doc_ids[m])
        body_start, body_end = int(split.offsets[doc]), int(split.offsets[doc + 1])
        n_body = body_end - body_start
        return split, body_start, n_body, max(first - 1, 0), min(last - 1, n_body)

    def _document_slice(self, m: int, first: int, last: int) -> np.ndarray:
        """Tokens `first:last` of document m framed as `[BOS] body [EOS]` (int64)."""
        split, body_start, n_body, lo, hi = self._body_range(m, first, last)
        parts = []
        if first == 0:
            parts.append(np.array([self.bos_id], dtype=np.int64))
        if hi > lo:
            parts.append(np.asarray(split.tokens[body_start + lo:body_start + hi], dtype=np.int64))
        if last == n_body + 2:
            parts.append(np.array([self.eos_id], dtype=np.int64))
        return np.concatenate(parts)

    def _trained_slice(self, m: int, first: int, last: int) -> np.ndarray:
        """bool `[last - first]`: which tokens `first:last` of document m may be targets (all, without a mask)."""
        split, body_start, n_body, lo, hi = self._body_range(m, first, last)
        mask = getattr(split, "target_mask", None)
        if mask is None:
            return np.ones(last - first, dtype=bool)
        trained = np.zeros(last - first, dtype=bool)  # BOS and EOS are never trained in a masked document
        if hi > lo:
            offset = 1 if first == 0 else 0  # the BOS comes first when the slice starts at the document start
            trained[offset:offset + hi - lo] = mask[body_start + lo:body_start + hi]
        return trained

    def example(self, index: int) -> dict[str, np.ndarray]:
        """Window `index` as model inputs: input_ids, labels, position_ids, each int64 `[seq_len]`."""
        return example_from(*self._window(index))


def example_from(tokens: np.ndarray, segments: np.ndarray, positions: np.ndarray, trained: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """A `[seq_len + 1]` window (tokens, document number, position, may-be-target) as model inputs."""
    labels = tokens[1:].copy()
    labels[segments[1:] != segments[:-1]] = IGNORE_INDEX
    labels[~trained[1:]] = IGNORE_INDEX
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
