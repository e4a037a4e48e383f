"""`build_data`: config -> tokenizer, shard caches (built where missing), train loader and evaluation stream."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lctrain.config import SYNTHETIC_SOURCES, Config, ConfigError, resolve_cache_dir
from lctrain.data import loader as _loader
from lctrain.data import shard_cache
from lctrain.data.cache import stable_hash
from lctrain.data.corpus import TrainSlots, split_entries
from lctrain.data.packing import PackedStream
from lctrain.data.parallel_build import build_missing, default_workers
from lctrain.data.readers import BadRecord
from lctrain.data.source_batches import SourceBatchLoader
from lctrain.data.sources import Source, build_sources
from lctrain.data.token_store import SourceTokens
from lctrain.data.tokenizer import Tokenizer, get_tokenizer


@dataclass
class Data:
    tokenizer: Tokenizer
    train: object  # TrainLoader / SourceBatchLoader; None for a plan only (`tokenize=False`)
    tokens_per_window: int
    sources: list = field(default_factory=list)  # `Source` per data.sources entry
    tokens: list = field(default_factory=list)  # `SourceTokens` per source (eval_sources after sources)
    plan: dict = field(default_factory=dict)  # shards, cached, missing, bytes, build stats
    bad_records: dict = field(default_factory=dict)  # source key -> records skipped (data.on_bad_record=skip)
    _eval: PackedStream | None = None
    _eval_args: tuple = ()

    def eval_batches(self, n: int) -> list[dict]:
        """Up to `n` batches of held-out windows: the same list on every call and on every rank."""
        if self._eval is None:
            return []
        return _loader.eval_batches(self._eval, n, *self._eval_args)

    def summary(self) -> str:
        """One line about the data: documents, shards, cache state and skipped records."""
        p = self.plan
        if p.get("streaming"):
            return (f"data: streaming {p.get('shards', 0)} shards ({p.get('bytes', 0) / 2**20:.1f} MiB) with "
                    f"{p.get('workers', 1)} tokenising workers per rank; {p.get('eval_docs', 0):,} evaluation "
                    f"documents from {p.get('eval_from', 'data.eval_sources')}")
        line = (f"data: {p.get('shards', 0)} shards ({p.get('cached', 0)} cached, {p.get('missing', 0)} to "
                f"tokenise, {p.get('bytes', 0) / 2**20:.1f} MiB)")
        if self.train is not None:
            line += (f"; {p.get('train_docs', 0):,} training documents, {p.get('eval_docs', 0):,} evaluation "
                     f"documents from {p.get('eval_from', 'data.eval_fraction')}")
        if self.bad_records:
            skipped = sum(self.bad_records.values())
            line += f"; skipped {skipped} bad records ({', '.join(f'{k}: {v}' for k, v in self.bad_records.items())})"
        return line


def _ranks() -> tuple[int, int]:
    from lctrain.train.dist import discover_ranks
    rank, world, _ = discover_ranks()
    return rank, world


def prepare_shards(sources: list, tokenizer, cache_dir: Path, on_bad: str, workers: int, rank: int, world: int,
                   progress: bool, tokenize: bool = True, only_mine: bool = False) -> tuple[dict, dict]:
    """Plan (and, when `tokenize`, build) the shard entries of the file sources.

    Returns ({source key: [entry keys in document order]}, plan stats). A source with `max_documents` is built in
    waves of `workers` shards in document order, until it holds enough documents."""
    root = Path(cache_dir) / "shards"
    keys, shards_of = {}, {}
    for source in sources:
        shards_of[source.key] = source.shards()
        keys[source.key] = [shard_cache.entry_key(s, tokenizer.fingerprint) for s in shards_of[source.key]]
    all_shards = [s for src in sources for s in shards_of[src.key]]
    all_keys = [k for src in sources for k in keys[src.key]]
    cached = sum((root / k).is_dir() for k in all_keys)
    plan = {"shards": len(all_keys), "cached": cached, "missing": len(all_keys) - cached,
            "bytes": sum(s.size for s in all_shards), "workers": workers}
    if not tokenize:
        return keys, plan
    # A file source with max_documents needs only its first shards: build them in growing waves, in order, until
    # they hold enough documents (stdlib plans only the files it needs).
    limited = [src for src in sources if src.max_documents and src.config.type != "stdlib"]
    totals = {"missing": 0, "built": 0, "bytes": 0, "tokens": 0, "seconds": 0.0, "shard_seconds": [],
              "shard_cpu_seconds": [], "worker_rss_mib": []}

    def build(shards, shard_keys):
        result = build_missing(shards, shard_keys, root, tokenizer, on_bad, rank, world, workers, progress,
                               only_mine)
        for name, value in result.items():
            totals[name] += value

    for src in limited:
        wanted, have, size = [], 0, workers
        while len(wanted) < len(keys[src.key]) and have < src.max_documents:
            batch = list(range(len(wanted), min(len(wanted) + size, len(keys[src.key]))))
            build([shards_of[src.key][i] for i in batch], [keys[src.key][i] for i in batch])
            if only_mine and not all((root / keys[src.key][i]).is_dir() for i in batch):
                wanted = list(range(len(keys[src.key])))  # another share builds the rest: keep them all
                break
            wanted.extend(batch)
            have += sum(shard_cache.ShardEntry(root / keys[src.key][i]).meta["docs"] for i in batch)
            size *= 2
        keys[src.key] = [keys[src.key][i] for i in wanted]
    rest = [src for src in sources if src not in limited]
    build([s for src in rest for s in shards_of[src.key]], [k for src in rest for k in keys[src.key]])
    stats = totals
    plan["build"] = stats
    return keys, plan


def _open(source: Source, keys: list[str], root: Path, on_bad: str) -> tuple[list, int]:
    """The source's entries, and how many bad records they skipped (refused when on_bad is error)."""
    entries = [shard_cache.ShardEntry(root / key) for key in keys]
    skipped = 0
    for entry in entries:
        if entry.meta["skipped"] and on_bad != "skip":  # cached by a run that skipped; this one refuses
            raise BadRecord(f"{source.key}: {entry.meta['bad_examples'][0]}; fix or remove the record, or set "
                            "data.on_bad_record=skip")
        skipped += entry.meta["skipped"]
    return entries, skipped


def build_data(cfg: Config, dp_rank: int = 0, dp_size: int = 1, progress: bool = True,
               batches_per_step: int = 1, tokenize: bool = True) -> Data:
    """Everything the training loop needs from `cfg.data` (plus `train.seed`, `train.micro_batch_size`).
    `batches_per_step` (gradient accumulation) keeps a step on one source under `data.batching: per_source`.

    Trains the tokenizer and tokenises missing shards on first use (shared out across the job's processes and
    their worker processes); later runs open the shard entries under `resolve_cache_dir(cfg)` directly. With
    `tokenize=False` (`--dry-run`) only the tokenizer is made and the plan counted: `train` is None.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    data_cfg = cfg.data
    cache_dir = resolve_cache_dir(cfg)
    sources = build_sources(data_cfg.sources, data_cfg.max_documents, cache_dir)
    eval_sources = build_sources(data_cfg.eval_sources, data_cfg.max_documents, cache_dir, "data.eval_sources")
    if data_cfg.streaming:
        synthetic = [s.key for s in sources if s.config.type in SYNTHETIC_SOURCES]
        if synthetic:
            raise ConfigError(f"data.streaming: {synthetic[0]} is a generated source; streaming reads file and hf "
                              "sources only (generated sources need no cache: turn streaming off)")
        for source in sources:
            source.hash_content = False
    tokenizer = get_tokenizer(data_cfg, sources, cache_dir, memo=not data_cfg.streaming)
    if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
        raise ConfigError(f"data.tokenizer: {data_cfg.tokenizer!r} defines no BOS/EOS pieces; expected a model "
                          "trained with bos_id and eos_id set")
    rank, world = _ranks()
    workers = data_cfg.num_workers or default_workers()
    if data_cfg.streaming:
        return _streaming_data(cfg, sources, eval_sources, tokenizer, cache_dir, dp_rank, dp_size, workers, rank,
                               world, progress, tokenize)
    file_sources = [s for s in sources + eval_sources if s.config.type not in SYNTHETIC_SOURCES]
    keys, plan = prepare_shards(file_sources, tokenizer, cache_dir, data_cfg.on_bad_record, workers, rank, world,
                                progress and rank == 0, tokenize)
    if not tokenize:
        return Data(tokenizer=tokenizer, train=None, tokens_per_window=data_cfg.seq_len, sources=sources, plan=plan)

    root = Path(cache_dir) / "shards"
    tokens, bad = [], {}
    use_eval_sources = bool(eval_sources)
    for source in sources + eval_sources:
        is_eval = source in eval_sources
        if source.config.type in SYNTHETIC_SOURCES:
            store = source.build_tokens(tokenizer, 0.0 if use_eval_sources and not is_eval else
                                        data_cfg.eval_fraction, data_cfg.seq_len)
            if is_eval:  # every generated document of an evaluation source is evaluation data
                store = SourceTokens(store.eval, store.train, store.meta, None)
            tokens.append(store)
            continue
        entries, skipped = _open(source, keys[source.key], root, data_cfg.on_bad_record)
        if skipped:
            bad[source.key] = skipped
        fraction = 0.0 if use_eval_sources else data_cfg.eval_fraction
        if is_eval:
            train, evaluation = split_entries(entries, fraction, source.max_documents, all_eval=True)
        else:  # the loader looks documents up in the entries: no per-document arrays for training
            train = TrainSlots(entries, fraction, source.max_documents)
            evaluation = train.held_out_split()
        meta = {"source": source.key, "shards": keys[source.key], "train_docs": len(train),
                "eval_docs": len(evaluation)}
        tokens.append(SourceTokens(train, evaluation, meta, None))
    train_stores = tokens[:len(sources)]
    for source, store in zip(sources, train_stores):
        if len(store.train) == 0:
            raise ConfigError(f"{source.key}.path: {_describe(source)} has no training documents "
                              f"({len(store.eval)} held out); add text or lower data.eval_fraction")
    fingerprint = stable_hash({
        "tokens": [store.meta.get("content_hash") or store.meta["shards"] for store in train_stores],
        "max_documents": data_cfg.max_documents, "eval_fraction": data_cfg.eval_fraction,
        "eval_sources": bool(eval_sources), "tokenizer": tokenizer.fingerprint,
        "weights": [source.weight for source in sources], "seq_len": data_cfg.seq_len,
    })
    loader_args = ([store.train for store in train_stores], [source.weight for source in sources],
                   data_cfg.seq_len, cfg.train.micro_batch_size, cfg.train.seed, dp_rank, dp_size, tokenizer.bos_id,
                   tokenizer.eos_id, fingerprint)
    if data_cfg.batching == "per_source":
        train_loader = SourceBatchLoader(*loader_args, batches_per_step=batches_per_step)
    else:
        train_loader = _loader.TrainLoader(*loader_args)
    eval_stores = tokens[len(sources):] if use_eval_sources else train_stores
    evaluation = None
    if any(len(store.eval) for store in eval_stores):
        evaluation = _loader.eval_stream([store.eval for store in eval_stores], data_cfg.seq_len, tokenizer.bos_id,
                                         tokenizer.eos_id)
    plan.update(train_docs=sum(len(s.train) for s in train_stores), eval_docs=sum(len(s.eval) for s in eval_stores),
                eval_from="data.eval_sources" if use_eval_sources else f"data.eval_fraction={data_cfg.eval_fraction}")
    return Data(tokenizer=tokenizer, train=train_loader, tokens_per_window=data_cfg.seq_len, sources=sources,
                tokens=tokens, plan=plan, bad_records=bad, _eval=evaluation,
                _eval_args=(cfg.train.micro_batch_size,))


def _streaming_data(cfg, sources, eval_sources, tokenizer, cache_dir, dp_rank, dp_size, workers, rank, world,
                    progress, tokenize) -> Data:
    """`data.streaming`: the training sources are read while training; evaluation data (`data.eval_sources`) is
    cached as usual."""
    from lctrain.data.streaming import StreamingLoader

    data_cfg = cfg.data
    shards = [shard for source in sources for shard in source.planned_shards()]
    plan = {"shards": len(shards), "cached": 0, "missing": 0, "bytes": sum(s.size for s in shards),
            "streaming": True, "workers": workers,
            "eval_from": "data.eval_sources" if eval_sources else "none (streaming: set data.eval_sources)"}
    if not tokenize:
        return Data(tokenizer=tokenizer, train=None, tokens_per_window=data_cfg.seq_len, sources=sources, plan=plan)
    fingerprint = stable_hash({
        "streaming": [[s.label, s.size, s.content] for s in shards], "tokenizer": tokenizer.fingerprint,
        "weights": [source.weight for source in sources], "seq_len": data_cfg.seq_len,
    })
    train = StreamingLoader(sources, tokenizer, data_cfg.seq_len, cfg.train.micro_batch_size, cfg.train.seed,
                            dp_rank, dp_size, data_cfg.on_bad_record, workers, fingerprint)
    tokens, evaluation = [], None
    if eval_sources:
        files = [s for s in eval_sources if s.config.type not in SYNTHETIC_SOURCES]
        keys, _ = prepare_shards(files, tokenizer, cache_dir, data_cfg.on_bad_record, workers, rank, world,
                                 progress and rank == 0)
        root = Path(cache_dir) / "shards"
        for source in eval_sources:
            if source.config.type in SYNTHETIC_SOURCES:
                store = source.build_tokens(tokenizer, data_cfg.eval_fraction, data_cfg.seq_len)
                tokens.append(SourceTokens(store.eval, store.train, store.meta, None))
                continue
            entries, _ = _open(source, keys[source.key], root, data_cfg.on_bad_record)
            train_split, eval_split = split_entries(entries, 0.0, source.max_documents, all_eval=True)
            tokens.append(SourceTokens(train_split, eval_split, {"source": source.key}, None))
        evaluation = _loader.eval_stream([store.eval for store in tokens], data_cfg.seq_len, tokenizer.bos_id,
                                         tokenizer.eos_id)
    plan["eval_docs"] = sum(len(s.eval) for s in tokens)
    return Data(tokenizer=tokenizer, train=train, tokens_per_window=data_cfg.seq_len, sources=sources,
                tokens=tokens, plan=plan, _eval=evaluation, _eval_args=(cfg.train.micro_batch_size,))


def _describe(source) -> str:
    if source.config.type in SYNTHETIC_SOURCES:
        return f"the {source.config.type} generator"
    return "the standard library" if source.config.type == "stdlib" else repr(source.config.path)

