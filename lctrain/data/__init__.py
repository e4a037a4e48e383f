"""Data pipeline: local sources -> sentencepiece tokenizer -> cached token arrays -> packed, sharded batches.

    data = build_data(cfg, dp_rank, dp_size)
    data.tokenizer            Tokenizer
    data.train                endless iterator of batches; .state_dict() / .load_state_dict(state)
    data.eval_batches(n)      the first n batches of held-out documents, identical on every rank ([] if none)
    data.tokens_per_window    == cfg.data.seq_len

A batch is a dict of `input_ids`, `labels` (-100 = no loss: across document boundaries, and at the targets a
synthetic task does not train, e.g. everything but the answers of MQAR), `position_ids`, all int64
`[micro_batch_size, seq_len]`, and `cu_seqlens` int32 `[N+1]` (document boundaries over the flattened tokens, equal to
`lctrain.models.context.cu_seqlens_from_positions(position_ids)`).

Modules: `sources` (reading files through HF datasets), `stdlib_source` (the embedded default corpus),
`synthetic` (seeded MQAR and passkey documents, generated in memory instead of cached),
`tokenizer`, `token_store` (memory-mapped token cache), `cache` (atomic, locked cache entries), `sampling` (split
and mixture), `packing` (windows), `loader` (order, sharding, state), `source_batches` (one source per step).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from lctrain.config import SYNTHETIC_SOURCES, Config, ConfigError, resolve_cache_dir
from lctrain.data import loader as _loader
from lctrain.data import token_store
from lctrain.data.cache import stable_hash
from lctrain.data.packing import PackedStream
from lctrain.data.source_batches import SourceBatchLoader
from lctrain.data.sources import Source, build_sources
from lctrain.data.tokenizer import Tokenizer, get_tokenizer

__all__ = ["Data", "Tokenizer", "build_data"]


@dataclass
class Data:
    tokenizer: Tokenizer
    train: _loader.TrainLoader
    tokens_per_window: int
    sources: list = field(default_factory=list)  # `Source` per data.sources entry
    tokens: list = field(default_factory=list)  # `token_store.SourceTokens` per source
    _eval: PackedStream | None = None
    _eval_args: tuple = ()

    def eval_batches(self, n: int) -> list[dict]:
        """Up to `n` batches of held-out windows: the same list on every call and on every rank."""
        if self._eval is None:
            return []
        return _loader.eval_batches(self._eval, n, *self._eval_args)


def build_data(cfg: Config, dp_rank: int = 0, dp_size: int = 1, progress: bool = True,
               batches_per_step: int = 1) -> Data:
    """Everything the training loop needs from `cfg.data` (plus `train.seed`, `train.micro_batch_size`).
    `batches_per_step` (gradient accumulation) keeps a step on one source under `data.batching: per_source`.

    Trains the tokenizer and tokenises the sources on first use (once, under file locks, so concurrent ranks
    share the work); later runs open the caches under `resolve_cache_dir(cfg)` directly.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    data_cfg = cfg.data
    cache_dir = resolve_cache_dir(cfg)
    sources = build_sources(data_cfg.sources, data_cfg.max_documents, cache_dir / "hf")
    with _datasets_progress(progress):
        tokenizer = get_tokenizer(data_cfg, sources, cache_dir)
        if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
            raise ConfigError(f"data.tokenizer: {data_cfg.tokenizer!r} defines no BOS/EOS pieces; expected a model "
                              "trained with bos_id and eos_id set")
        tokens = [source.build_tokens(tokenizer, data_cfg.eval_fraction, data_cfg.seq_len)
                  if source.config.type in SYNTHETIC_SOURCES else
                  token_store.load_or_build(source, tokenizer, data_cfg.eval_fraction, cache_dir, progress)
                  for source in sources]
    for source, store in zip(sources, tokens):
        if len(store.train) == 0:
            raise ConfigError(f"{source.key}.path: {_describe(source)} has no training documents "
                              f"({len(store.eval)} held out); add text or lower data.eval_fraction")
    fingerprint = stable_hash({
        "tokens": [store.meta["content_hash"] for store in tokens], "tokenizer": tokenizer.fingerprint,
        "weights": [source.weight for source in sources], "seq_len": data_cfg.seq_len,
    })
    loader_args = ([store.train for store in tokens], [source.weight for source in sources], data_cfg.seq_len,
                   cfg.train.micro_batch_size, cfg.train.seed, dp_rank, dp_size, tokenizer.bos_id, tokenizer.eos_id,
                   fingerprint)
    if data_cfg.batching == "per_source":
        train = SourceBatchLoader(*loader_args, batches_per_step=batches_per_step)
    else:
        train = _loader.TrainLoader(*loader_args)
    evaluation = None
    if any(len(store.eval) for store in tokens):
        evaluation = _loader.eval_stream([store.eval for store in tokens], data_cfg.seq_len, tokenizer.bos_id,
                                         tokenizer.eos_id)
    return Data(tokenizer=tokenizer, train=train, tokens_per_window=data_cfg.seq_len, sources=sources,
                tokens=tokens, _eval=evaluation, _eval_args=(cfg.train.micro_batch_size,))


def _describe(source: Source) -> str:
    if source.config.type in SYNTHETIC_SOURCES:
        return f"the {source.config.type} generator"
    return "the standard library" if source.config.type == "stdlib" else repr(source.config.path)


@contextmanager
def _datasets_progress(enabled: bool):
    """Silence HF datasets' own progress bars when ours are off, restoring the previous setting afterwards.
    A no-op without the `datasets` package: synthetic, stdlib and token-file sources never need it."""
    try:
        import datasets
    except ImportError:
        yield
        return

    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            datasets.enable_progress_bars()
