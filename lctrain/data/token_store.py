"""In-memory token splits: one flat token array plus document offsets per split (synthetic sources build these;
cached text sources use `corpus.ShardedSplit`, the same interface over memory-mapped shard entries)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

@dataclass
class TokenSplit:
    """Documents of one split. tokens: `[n_tokens]` uint16/uint32 (memory-mapped); offsets: int64 `[n_docs+1]`."""
    tokens: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        """int64 `[n_docs]`: tokens per document (without BOS/EOS)."""
        return np.diff(self.offsets)

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]


@dataclass
class SourceTokens:
    train: TokenSplit
    eval: TokenSplit
    meta: dict
    path: Path


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
