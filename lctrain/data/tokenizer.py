"""SentencePiece tokenizer: load one (`data.tokenizer: PATH`) or train one on the sources and cache it.

A trained tokenizer is BPE with byte fallback (any Unicode text round-trips: characters the model never saw become
their UTF-8 bytes), special ids pad=0 unk=1 bos=2 eos=3, identity normalisation and no whitespace folding (source
code keeps its indentation; runs of spaces may become single pieces). Newlines and tabs are encoded as byte pieces.

Training reads a deterministic sample of `data.tokenizer_sample_chars` characters: each source gets a share
proportional to its weight, filled from its documents in a fixed hashed order. The model is written to
`<cache_dir>/tokenizers/<hash>/tokenizer.model`, where the hash covers the sources' fingerprints and weights and the
training settings, so a second run (or another rank) loads it instead of training again.
"""
from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from lctrain.config import ConfigError
from lctrain.data import cache, sampling

MODEL_FILE = "tokenizer.model"
_BYTE_PIECES = 256
_SPECIAL_PIECES = 4  # pad, unk, bos, eos
_MAX_LINE_CHARS = 4096  # sentencepiece drops training sentences longer than max_sentence_length bytes
_TRAINER_VERSION = 1  # bump when the trainer settings below change, so old caches are not reused


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

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

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


def sample_lines(sources, total_chars: int) -> Iterator[str]:
    """The tokenizer's training text: per source a weight-proportional character budget, read from its
    documents in `sampling.sample_order`, split into non-empty lines of at most `_MAX_LINE_CHARS` characters."""
    weight_sum = sum(source.weight for source in sources)
    for source in sources:
        budget = max(1, int(total_chars * source.weight / weight_sum))
        dataset = source.dataset()
        order = sampling.sample_order(len(dataset), source.index)
        for start in range(0, len(order), 256):
            if budget <= 0:
                break
            for text in dataset.select(order[start:start + 256])["text"]:
                if not text or budget <= 0:
                    continue
                text = text[:budget]
                budget -= len(text)
                for line in text.split("\n"):
                    for cut in range(0, len(line), _MAX_LINE_CHARS):
                        piece = line[cut:cut + _MAX_LINE_CHARS]
                        if piece.strip():
                            yield piece


def tokenizer_cache_key(sources, vocab_size: int, sample_chars: int) -> str:
    return cache.stable_hash({
        "version": _TRAINER_VERSION, "vocab_size": vocab_size, "sample_chars": sample_chars,
        "sources": [[source.fingerprint(), source.weight] for source in sources],
    })


def get_tokenizer(data_cfg, sources, cache_dir: Path) -> Tokenizer:
    """`data.tokenizer` when set, else the cached trained tokenizer for these sources (training it if needed)."""
    if data_cfg.tokenizer:
        return Tokenizer.load(data_cfg.tokenizer)
    key = tokenizer_cache_key(sources, data_cfg.vocab_size, data_cfg.tokenizer_sample_chars)

    def build(directory: Path) -> None:
        proto = train_tokenizer(sample_lines(sources, data_cfg.tokenizer_sample_chars), data_cfg.vocab_size)
        Tokenizer(proto).save(directory)

    entry = cache.build_once(Path(cache_dir) / "tokenizers", key, build)
    return Tokenizer.load(entry)

