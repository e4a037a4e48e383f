"""Tokenised documents on disk: per source and split, one flat token array plus document offsets, memory-mapped.

Layout of one entry `<cache_dir>/tokens/<hash>/` (hash of the source fingerprint, the tokenizer model and the
eval fraction):
    train.bin            flat tokens of the training documents, uint16 (vocab <= 65536) or uint32, no BOS/EOS
    train_offsets.npy    int64 [n_docs + 1]; document i is tokens[offsets[i]:offsets[i + 1]]
    eval.bin, eval_offsets.npy   the same for the held-out documents
    meta.json            dtype, counts and a content hash of the token arrays (the data fingerprint)
The entry is built once under a lock and published by an atomic rename (see `cache`), so a second run, or another
rank, opens the arrays without tokenising again and without reading the source files.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lctrain.data import cache, sampling

_FORMAT_VERSION = 1
_ENCODE_BATCH = 256


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


def load_or_build(source, tokenizer, eval_fraction: float, cache_dir: Path, progress: bool = True) -> SourceTokens:
    """The source's tokenised splits, tokenising (once, under a lock) when no complete cache entry exists."""
    key = cache.stable_hash({"version": _FORMAT_VERSION, "source": source.fingerprint(),
                             "tokenizer": tokenizer.fingerprint, "eval_fraction": eval_fraction})
    entry = cache.build_once(Path(cache_dir) / "tokens", key,
                             lambda directory: _build(directory, source, tokenizer, eval_fraction, progress))
    return open_entry(entry)


def open_entry(entry: Path) -> SourceTokens:
    meta = json.loads((entry / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for name in ("train", "eval"):
        offsets = np.load(entry / f"{name}_offsets.npy")
        count = int(offsets[-1])
        tokens = (np.memmap(entry / f"{name}.bin", dtype=dtype, mode="r", shape=(count,)) if count
                  else np.zeros(0, dtype=dtype))
        splits[name] = TokenSplit(tokens, offsets)
    return SourceTokens(splits["train"], splits["eval"], meta, entry)


def _build(directory: Path, source, tokenizer, eval_fraction: float, progress: bool) -> None:
    from tqdm.auto import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    dataset = source.dataset()
    lengths = []
    # Pass 1: every non-empty document, in order, into one stream (the split needs the final document count).
    with open(directory / "all.bin", "wb") as stream, \
            tqdm(total=len(dataset), unit="doc", desc=f"tokenising {source.key}", disable=not progress) as bar:
        for batch_rows in dataset.iter(batch_size=_ENCODE_BATCH):
            batch = [text for text in batch_rows["text"] if text]
            for ids in tokenizer.encode_batch(batch) if batch else []:
                np.asarray(ids, dtype=dtype).tofile(stream)
                lengths.append(len(ids))
            bar.update(len(batch_rows["text"]))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    all_tokens = (np.memmap(directory / "all.bin", dtype=dtype, mode="r", shape=(int(offsets[-1]),))
                  if offsets[-1] else np.zeros(0, dtype=dtype))

    # Pass 2: copy each document to its split.
    held_out = sampling.eval_mask(len(lengths), eval_fraction)
    digest = hashlib.sha256()
    meta = {"version": _FORMAT_VERSION, "dtype": dtype.name, "source": source.key,
            "source_type": source.config.type, "tokenizer": tokenizer.fingerprint}
    for name, wanted in (("train", ~held_out), ("eval", held_out)):
        indices = np.flatnonzero(wanted)
        split_offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(np.asarray(lengths, dtype=np.int64)[indices], out=split_offsets[1:])
        with open(directory / f"{name}.bin", "wb") as out:
            for i in indices:
                chunk = np.ascontiguousarray(all_tokens[offsets[i]:offsets[i + 1]])
                chunk.tofile(out)
                digest.update(chunk.tobytes())
        np.save(directory / f"{name}_offsets.npy", split_offsets)
        digest.update(split_offsets.tobytes())
        meta[f"{name}_docs"] = int(len(indices))
        meta[f"{name}_tokens"] = int(split_offsets[-1])
    del all_tokens
    (directory / "all.bin").unlink()
    meta["content_hash"] = digest.hexdigest()[:20]
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))
