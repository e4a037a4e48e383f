"""Synthetic recall data, generated from a seed: multi-query associative recall (MQAR) and passkey retrieval.

Both serve twice: as training sources (`data.sources: [{type: mqar}, ...]`, mixable with text) and as the prompt
builders of `lctrain.eval`, so a model is evaluated on exactly the format it was trained on.

MQAR is token-level. Its documents are made of token ids, never text: they bypass the text tokenizer and use a
reserved block of ids right after the tokenizer's special pieces (`task_id_base`: 4 for the tokenizers lctrain
trains, pad=0 unk=1 bos=2 eos=3). With `task_vocab = 2K`, keys are ids `base .. base+K-1` and values
`base+K .. base+2K-1`. Non-query positions hold the pad id, which text never produces. Mixed with text, the same
ids are ordinary text pieces (byte pieces, for a trained tokenizer); the model tells the tasks apart from context,
as it does with any mixture. A document of `length` tokens, N pairs:

    k1 v1 k2 v2 ... kN vN | pad pad kj vj pad ... ki vi pad ...
    `---- 2N context ----'  `---- query region: every key once, in random order, at power-law gaps ----'

Query slots (pairs of positions after the context) are drawn without replacement with weight
(gap + 1)^(alpha - 1), alpha = 0.01, so most queries come soon after the context and some come late (the gap
distribution of Zoology's MQAR). A query is the key followed by its value, so plain next-token prediction on the
document contains the task: at a query key the next token is its value. As in Zoology, training puts the loss
on the answers only: the source's documents carry a per-token `target_mask` (True at the value after each query
key) and packing gives every other target of the document label -100, so the random context keys and values and
the filler, which no model can predict, add neither loss nor gradient noise. Evaluation scores the same positions.

Passkey is text-level: random filler sentences with "The pass key is 12345. Remember it. ..." hidden at a random
depth, then "What is the pass key? The pass key is" and the answer " 12345.". The pieces are tokenised separately
and concatenated, so a document has exactly `length` tokens; the training documents end with the answer.

Randomness uses only `Generator.random()` on PCG64 (floats whose bit stream numpy keeps stable) and derives every
other choice from those floats, so a seed gives the same documents across numpy versions.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from lctrain.config import ConfigError, SourceConfig
from lctrain.data.token_store import SourceTokens, TokenSplit, token_dtype

GAP_ALPHA = 0.01  # power-law exponent of the query gaps (Zoology's default)
_VERSION = 2  # bump when the documents or their target masks change (fingerprints, resume checks)
_TRAIN_STREAM, _EVAL_STREAM = 0, 1

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_ANSWER = " {key}."
PASSKEY_DIGITS = 5


def rng_for(seed: int, stream: int, *extra: int) -> np.random.Generator:
    """An independent generator per (seed, stream, ...) so train, eval and each eval setting never overlap."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(stream), *map(int, extra)])))


def _sample_without_replacement(rng: np.random.Generator, rows: int, population: int, k: int,
                                log_weights: np.ndarray | None = None) -> np.ndarray:
    """int64 `[rows, k]`: per row k distinct indices of `range(population)`, proportional to exp(log_weights)
    (uniform when None). Gumbel-top-k: the k largest of log w + Gumbel noise are a weighted sample without
    replacement, in order of drawing."""
    u = rng.random((rows, population))
    keys = -np.log(-np.log(np.clip(u, 1e-300, 1.0 - 1e-16)))
    if log_weights is not None:
        keys = keys + log_weights[None, :]
    return np.argsort(-keys, axis=1, kind="stable")[:, :k]


def task_id_base(tokenizer) -> int:
    """First id of the MQAR block: right after the largest special id (pad, unk, bos, eos)."""
    if tokenizer is None:
        return 4  # the layout of every tokenizer lctrain trains
    return 1 + max(tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id)


def mqar_documents(rng: np.random.Generator, count: int, length: int, num_kv_pairs: int, task_vocab: int,
                   base_id: int, filler_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` MQAR documents (see the module docstring).

    Returns tokens int64 `[count, length]` and answer_at bool `[count, length]`: True at the query keys, i.e. where
    the next token (`tokens[:, p + 1]`) is the value to recall.
    """
    n, half = num_kv_pairs, task_vocab // 2
    if n > half or length < 4 * n or n <= 0:
        raise ValueError(f"mqar: {n} pairs need task_vocab >= {2 * n} and length >= {4 * n} "
                         f"(got task_vocab={task_vocab}, length={length})")
    keys = base_id + _sample_without_replacement(rng, count, half, n)  # [count, N] distinct keys
    values = base_id + half + _sample_without_replacement(rng, count, half, n)
    slots_total = (length - 2 * n) // 2
    gap_log_weights = (GAP_ALPHA - 1.0) * np.log(np.arange(1, slots_total + 1, dtype=np.float64))
    slots = _sample_without_replacement(rng, count, slots_total, n, gap_log_weights)
    # Decouple the order of the context from the order of the queries (the first draws are the short gaps).
    order = _sample_without_replacement(rng, count, n, n)
    slots = np.take_along_axis(slots, order, axis=1)

    tokens = np.full((count, length), filler_id, dtype=np.int64)
    tokens[:, 0:2 * n:2] = keys
    tokens[:, 1:2 * n:2] = values
    rows = np.arange(count)[:, None]
    key_positions = 2 * n + 2 * slots
    tokens[rows, key_positions] = keys
    tokens[rows, key_positions + 1] = values
    answer_at = np.zeros((count, length), dtype=bool)
    answer_at[rows, key_positions] = True
    return tokens, answer_at


# ----------------------------------------------------------------------------------------------- passkey
def random_digits(rng: np.random.Generator, count: int, digits: int = PASSKEY_DIGITS) -> list[str]:
    """`count` random keys of exactly `digits` digits (no leading zero)."""
    low = 10 ** (digits - 1)
    return [str(low + int(u * 9 * low)) for u in rng.random(count)]


def insert_at_depth(haystack: list[int], needle: list[int], depth: float, unit: int = 0) -> list[int]:
    """`haystack` with `needle` inserted at fraction `depth` in [0, 1] of it; with `unit` > 0 the point is moved
    back to a multiple of `unit` (a sentence boundary of a repeated filler)."""
    point = int(round(depth * len(haystack)))
    if unit > 0:
        point -= point % unit
    point = max(0, min(point, len(haystack)))
    return haystack[:point] + needle + haystack[point:]



class TextTable:
    """The part of `datasets.Dataset` the tokenizer trainer and the token store read (`len`, `select(...)["text"]`,
    `iter(batch_size)`), over an in-memory list of texts."""

    def __init__(self, texts: list[str]):
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices) -> dict:
        return {"text": [self.texts[int(i)] for i in indices]}

    def iter(self, batch_size: int):
        for start in range(0, len(self.texts), batch_size):
            yield {"text": self.texts[start:start + batch_size]}

class PasskeyPrompts:
    """Token ids of passkey prompts for one tokenizer (the fixed pieces are encoded once)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.filler = tokenizer.encode(PASSKEY_FILLER)
        self.question = tokenizer.encode(PASSKEY_QUESTION)

    def answer_ids(self, key: str) -> list[int]:
        return self.tokenizer.encode(PASSKEY_ANSWER.format(key=key))

    def prompt(self, key: str, n_tokens: int, depth: float) -> list[int]:
        """A prompt of exactly `n_tokens` tokens ending with the question; the needle sits at `depth` of the
        filler, on a filler boundary."""
        needle = self.tokenizer.encode(PASSKEY_NEEDLE.format(key=key))
        room = n_tokens - len(needle) - len(self.question)
        if room < 0:
            raise ConfigError(f"passkey: {n_tokens} tokens cannot hold the needle and the question "
                              f"({len(needle) + len(self.question)} tokens); use a longer length")
        reps = room // len(self.filler) + 1
        haystack = (self.filler * reps)[:room]
        return insert_at_depth(haystack, needle, depth, unit=len(self.filler)) + self.question

    def document(self, key: str, n_tokens: int, depth: float) -> list[int]:
        """A training document of exactly `n_tokens` tokens: prompt + answer."""
        answer = self.answer_ids(key)
        return self.prompt(key, n_tokens - len(answer), depth) + answer


# ----------------------------------------------------------------------------------------------- source
@dataclass
class MaskedTokenSplit(TokenSplit):
    """A `TokenSplit` whose documents are trained on some targets only. target_mask: bool `[n_tokens]`, True
    where the token is a loss target (predicted from the token before it); see `lctrain.data.packing`."""
    target_mask: np.ndarray


def answer_targets(answer_at: np.ndarray) -> np.ndarray:
    """bool, shape of `answer_at`: True at the answers, one position after each query key."""
    targets = np.zeros_like(answer_at)
    targets[..., 1:] = answer_at[..., :-1]
    return targets


class SyntheticSource:
    """A `data.sources` entry of type `mqar` or `passkey`: same interface as `sources.Source` for the tokenizer
    (`tokenizer_texts()`, `fingerprint()`), and `build_tokens()` in place of the token cache (generating is faster than
    reading a cache)."""

    def __init__(self, config: SourceConfig, index: int, max_documents: int):
        self.config = config
        self.index = index
        self.key = f"data.sources[{index}]"
        self.max_documents = max_documents
        self.files = []
        self._dataset = None

    @property
    def weight(self) -> float:
        return self.config.weight

    def describe(self) -> dict:
        c = self.config
        described = {"type": c.type, "version": _VERSION, "num_examples": self.num_documents, "seed": c.seed,
                     "length": c.length}
        if c.type == "mqar":
            described.update(num_kv_pairs=c.num_kv_pairs, task_vocab=c.task_vocab)
        elif c.answer_only:
            described["answer_only"] = True  # a different loss mask: a different cache entry
        return described

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:20]

    @property
    def num_documents(self) -> int:
        n = self.config.num_examples
        return min(n, self.max_documents) if self.max_documents else n

    # What the tokenizer sees of this source. MQAR contributes only a short fixed line (its ids are reserved, not
    # learned pieces); passkey contributes its fixed sentences and digits.
    def tokenizer_texts(self) -> list[str]:
        if self.config.type == "mqar":
            return ["Synthetic token-level task data. 0123456789"]
        rng = rng_for(self.config.seed, 99)
        return [PASSKEY_FILLER * 3 + PASSKEY_NEEDLE.format(key=key) + PASSKEY_QUESTION + PASSKEY_ANSWER.format(key=key)
                for key in random_digits(rng, 64)]

    def dataset(self):
        if self._dataset is None:  # a few fixed lines: no need for (or import of) HF datasets
            self._dataset = TextTable(self.tokenizer_texts())
        return self._dataset

    def iter_texts(self, batch_size: int = 256):
        yield from self.tokenizer_texts()

    def resolved_length(self, seq_len: int) -> int:
        return self.config.length or seq_len - 2

    def build_tokens(self, tokenizer, eval_fraction: float, seq_len: int) -> SourceTokens:
        """The train and held-out documents as in-memory splits; MQAR splits carry their answer mask."""
        n_train = self.num_documents
        n_eval = math.ceil(n_train * eval_fraction) if eval_fraction > 0 else 0
        length = self.resolved_length(seq_len)
        dtype = token_dtype(tokenizer.vocab_size)
        splits, digest = {}, hashlib.sha256(self.fingerprint().encode())
        for name, count, stream in (("train", n_train, _TRAIN_STREAM), ("eval", n_eval, _EVAL_STREAM)):
            docs, targets = self._generate(tokenizer, count, length, rng_for(self.config.seed, stream))
            flat = docs.reshape(-1).astype(dtype)
            offsets = np.arange(count + 1, dtype=np.int64) * length
            digest.update(flat.tobytes())
            if targets is None:
                splits[name] = TokenSplit(flat, offsets)
            else:
                splits[name] = MaskedTokenSplit(flat, offsets, targets.reshape(-1))
                digest.update(splits[name].target_mask.tobytes())
        meta = {"source": self.key, "source_type": self.config.type, "train_docs": n_train, "eval_docs": n_eval,
                "tokenizer": tokenizer.fingerprint, "content_hash": digest.hexdigest()[:20]}
        return SourceTokens(splits["train"], splits["eval"], meta, None)

    def _generate(self, tokenizer, count: int, length: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """int64 `[count, length]` documents and, for MQAR (and passkey with `answer_only`), their bool
        `[count, length]` answer targets (otherwise passkey documents train on every token: None)."""
        if self.config.type == "mqar":
            base = task_id_base(tokenizer)
            top = base + self.config.task_vocab
            if top > tokenizer.vocab_size:
                raise ConfigError(f"{self.key}.task_vocab: ids {base}..{top - 1} do not fit the tokenizer's "
                                  f"{tokenizer.vocab_size} ids; lower task_vocab or use a larger tokenizer")
            tokens, answer_at = mqar_documents(rng, count, length, self.config.num_kv_pairs, self.config.task_vocab,
                                               base, tokenizer.pad_id)
            return tokens, answer_targets(answer_at)
        prompts = PasskeyPrompts(tokenizer)
        keys = random_digits(rng, count)
        depths = rng.random(count)
        tokens = np.array([prompts.document(key, length, depth) for key, depth in zip(keys, depths)], dtype=np.int64)
        if not self.config.answer_only:
            return tokens, None
        targets = np.zeros(tokens.shape, dtype=bool)  # the answer closes each document
        for row, key in enumerate(keys):
            targets[row, length - len(prompts.answer_ids(key)):] = True
        return tokens, targets
