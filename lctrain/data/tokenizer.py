"""SentencePiece tokenizer: load one (`data.tokenizer: PATH`) or train one on the sources and cache it.

A trained tokenizer is BPE with byte fallback (any Unicode text round-trips: characters the model never saw become
their UTF-8 bytes), special ids pad=0 unk=1 bos=2 eos=3, identity normalisation and no whitespace folding (source
code keeps its indentation; runs of spaces may become single pieces). Newlines and tabs are encoded as byte pieces.

Training reads a deterministic sample of `data.tokenizer_sample_chars` characters: each source gets a share
proportional to its weight, read from its shards in the order of their content hashes (see
`Source.sample_texts`). The model is written to `<cache_dir>/tokenizers/<hash>/tokenizer.model`, where the hash
covers the sample's text and the training settings, so a second run (or another rank) loads it instead of training
again, and adding a shard to a corpus keeps the tokenizer (and so every cached shard) unless that shard enters the
sample.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from lctrain.config import ConfigError
from lctrain.data import cache

MODEL_FILE = "tokenizer.model"
_BYTE_PIECES = 256
_SPECIAL_PIECES = 4  # pad, unk, bos, eos
_MAX_LINE_CHARS = 4096  # sentencepiece drops training sentences longer than max_sentence_length bytes
_TRAINER_VERSION = 2  # bump when the trainer settings below change, so old caches are not reused


class Tokenizer:
    """A loaded SentencePiece model. Ids are plain Python ints; `encode` adds no BOS/EOS (packing does)."""

    def __init__(self, model_proto: bytes, origin: str = ""):
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        self.origin = origin
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """From a `.model` file or a directory holding `tokenizer.model`."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise ConfigError(f"data.tokenizer: file not found: {path}")
        try:
            return cls(path.read_bytes(), origin=str(path))
        except (RuntimeError, OSError) as exc:
            raise ConfigError(f"data.tokenizer: {str(path)!r} is not a sentencepiece model ({exc})") from None

    def save(self, directory) -> Path:
        """Write the model as `<directory>/tokenizer.model`; returns that path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / MODEL_FILE
        target.write_bytes(self.model_proto)
        return target

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.model_proto).hexdigest()[:20]

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int:
        """The model's pad id, or eos when a loaded model defines none (labels use -100, never the pad id)."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], threads: int | None = None) -> list[list[int]]:
        """Token ids of each text. threads: sentencepiece's encoding threads (None: its default, every core); the
        cache build passes 1, because its parallelism is `data.num_workers` processes."""
        return self._sp.encode(list(texts), num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


# ----------------------------------------------------------------------------------------------- training
def train_tokenizer(lines: Iterable[str], vocab_size: int) -> bytes:
    """Train a BPE byte-fallback model on `lines` (sentences without newlines); returns the model bytes.

    Single-threaded and with input shuffling off, the result is the same bytes for the same lines.
    """
    import sentencepiece as spm

    lines = list(lines)
    if not lines:
        raise ConfigError("data.sources: the sources hold no text to train a tokenizer on")
    room = vocab_size - _BYTE_PIECES - _SPECIAL_PIECES
    if room < 8:
        raise ConfigError(f"data.vocab_size: {vocab_size} is too small for a byte-fallback tokenizer; expected "
                          f">= {_BYTE_PIECES + _SPECIAL_PIECES + 8}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, character_coverage=_character_coverage(lines, room * 3 // 4),
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, hard_vocab_limit=False,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=1, shuffle_input_sentence=False,
            max_sentence_length=4 * _MAX_LINE_CHARS, minloglevel=2)
    except RuntimeError as exc:
        if "required_chars" in str(exc):
            raise ConfigError(f"data.vocab_size: {vocab_size} leaves too little room beside the 260 byte and "
                              "special pieces for the characters of the sample; expected a larger value") from None
        raise ConfigError(f"data.vocab_size: sentencepiece could not train with vocab_size={vocab_size}: "
                          f"{str(exc).splitlines()[0]}") from None
    return model.getvalue()


def _character_coverage(lines: list[str], max_chars: int) -> float:
    """A coverage that keeps at most `max_chars` distinct characters as pieces (the rest fall back to bytes).

    SentencePiece adds characters by falling frequency while the covered share is below the coverage, so a
    value between the shares of the top `max_chars - 1` and top `max_chars` characters keeps exactly that many.
    It counts spaces as its own meta symbol; that is one character either way. SentencePiece refuses coverages
    below 0.98; with a vocabulary that small for the text, training fails and says so.
    """
    counts = Counter()
    for line in lines:
        counts.update(line)
    if len(counts) <= max_chars:
        return 1.0
    frequencies = sorted(counts.values(), reverse=True)
    total = sum(frequencies)
    below = sum(frequencies[:max_chars - 1])
    return max(0.98, (below + frequencies[max_chars - 1] / 2) / total)


def sample_lines(sources, total_chars: int, on_bad: str = "error") -> Iterator[str]:
    """The tokenizer's training text: per source a weight-proportional character budget (`Source.sample_texts`:
    shards in content-hash order; a synthetic source's fixed texts), split into non-empty lines of at most
    `_MAX_LINE_CHARS` characters."""
    weight_sum = sum(source.weight for source in sources)
    for source in sources:
        budget = max(1, int(total_chars * source.weight / weight_sum))
        if hasattr(source, "tokenizer_texts"):
            texts = _capped(source.tokenizer_texts(), budget)
        else:
            texts = source.sample_texts(budget, on_bad)
        for text in texts:
            for line in text.split("\n"):
                for cut in range(0, len(line), _MAX_LINE_CHARS):
                    piece = line[cut:cut + _MAX_LINE_CHARS]
                    if piece.strip():
                        yield piece


def _capped(texts, budget: int) -> Iterator[str]:
    for text in texts:
        if budget <= 0:
            return
        text = text[:budget]
        budget -= len(text)
        yield text


def tokenizer_cache_key(lines: list[str], vocab_size: int, sample_chars: int) -> str:
    """Keyed by the sample's content (not by file names or dates): the same text trains the same model."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
    return cache.stable_hash({"version": _TRAINER_VERSION, "vocab_size": vocab_size, "sample_chars": sample_chars,
                              "sample": digest.hexdigest()})


def _sources_key(sources, vocab_size: int, sample_chars: int) -> str:
    """What the sample is a function of: every shard's content and reader settings, and the weights."""
    described = []
    for source in sources:
        if hasattr(source, "tokenizer_texts"):
            described.append([source.weight, source.fingerprint()])
        else:
            described.append([source.weight, [[s.content, s.start, s.reader_params()] for s in source.shards()]])
    return cache.stable_hash({"version": _TRAINER_VERSION, "vocab_size": vocab_size, "sample_chars": sample_chars,
                              "sources": described})


def get_tokenizer(data_cfg, sources, cache_dir: Path, memo: bool = True) -> Tokenizer:
    """`data.tokenizer` when set, else the cached trained tokenizer for these sources (training it if needed).

    `tokenizers/by-sources/<hash>` remembers which model a set of shards gave, so a start with unchanged data
    reads no document at all (`memo=False` when the shards carry no content hashes: streaming)."""
    if data_cfg.tokenizer:
        return Tokenizer.load(data_cfg.tokenizer)
    root = Path(cache_dir) / "tokenizers"
    memo = (root / "by-sources" / _sources_key(sources, data_cfg.vocab_size, data_cfg.tokenizer_sample_chars)
            if memo else None)
    if memo is not None and memo.is_file() and (root / memo.read_text().strip() / MODEL_FILE).is_file():
        return Tokenizer.load(root / memo.read_text().strip())
    lines = list(sample_lines(sources, data_cfg.tokenizer_sample_chars, data_cfg.on_bad_record))
    key = tokenizer_cache_key(lines, data_cfg.vocab_size, data_cfg.tokenizer_sample_chars)

    def build(directory: Path) -> None:
        Tokenizer(train_tokenizer(lines, data_cfg.vocab_size)).save(directory)

    entry = cache.build_once(root, key, build)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}")
        tmp.write_text(key)
        os.replace(tmp, memo)
    return Tokenizer.load(entry)
