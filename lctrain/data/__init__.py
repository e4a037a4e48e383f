"""Data pipeline: local sources -> sentencepiece tokenizer -> per-shard token caches -> packed, sharded batches.

    data = build_data(cfg, dp_rank, dp_size)
    data.tokenizer            Tokenizer
    data.train                endless iterator of batches; .state_dict() / .load_state_dict(state)
    data.eval_batches(n)      the first n batches of held-out documents, identical on every rank ([] if none)
    data.tokens_per_window    == cfg.data.seq_len

A batch is a dict of `input_ids`, `labels` (-100 = no loss: across document boundaries, and at the targets a
synthetic task does not train, e.g. everything but the answers of MQAR), `position_ids`, all int64
`[micro_batch_size, seq_len]`, and `cu_seqlens` int32 `[N+1]` (document boundaries over the flattened tokens, equal to
`lctrain.models.context.cu_seqlens_from_positions(position_ids)`).

Modules: `sources` (configured sources), `shards` (sources -> content-hashed shards), `readers` (records of a
shard, bad-record checks), `stdlib_source` (the embedded default corpus), `synthetic` (seeded MQAR and passkey
documents, generated in memory instead of cached), `tokenizer`, `shard_cache` (one shard's token cache entry),
`parallel_build` (worker processes and ranks sharing the missing shards), `corpus` (shard entries -> train/eval
splits, held-out by content hash), `hf_source` (Hugging Face datasets in place), `cache` (atomic, locked cache
entries), `sampling` (mixture order), `packing` (windows), `loader` (order, sharding, state), `source_batches` (one
source per step), `streaming` (`data.streaming`: read and tokenise while training), `build` (`build_data`),
`prepare` (the `prepare` command).

This package imports its submodules lazily: tokenising worker processes import `shard_cache` without torch.
"""
from __future__ import annotations

__all__ = ["Data", "Tokenizer", "build_data"]


def __getattr__(name):
    if name in ("Data", "build_data"):
        from lctrain.data import build
        return getattr(build, name)
    if name == "Tokenizer":
        from lctrain.data.tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f"module 'lctrain.data' has no attribute {name!r}")
