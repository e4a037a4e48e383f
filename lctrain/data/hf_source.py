"""`{type: hf, name, config, split, field}`: a Hugging Face dataset through `datasets`, read in row ranges.

`name` is a `save_to_disk` directory (opened with `load_from_disk`, memory-mapped) or a dataset name that
`datasets.load_dataset` finds in its local cache (with HF_DATASETS_OFFLINE=1 nothing is downloaded). The dataset's
own Arrow files are read in place; lctrain keeps no copy of the text. Shards are ranges of `HF_SHARD_ROWS` rows; a
shard's content key is the dataset's fingerprint (which `datasets` derives from its data files) plus the range.
Rows are named `<name> row N` in errors.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from lctrain.config import ConfigError

HF_SHARD_ROWS = 50_000
_OPEN: dict = {}  # per process: (name, config, split) -> Dataset


def open_dataset(name: str, config: str, split: str, key: str):
    cached = _OPEN.get((name, config, split))
    if cached is not None:
        return cached
    import datasets

    try:
        if Path(name).is_dir():
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError(f"{key}.split: {split!r} is not a split of {name}; expected one of "
                                      f"{', '.join(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config or None, split=split)
    except ConfigError:
        raise
    except Exception as exc:  # datasets raises many types (offline, missing config, bad split)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{key}.name: cannot open the Hugging Face dataset {name!r} (config {config or 'default'}"
                          f", split {split}): {first}") from None
    _OPEN[(name, config, split)] = ds
    return ds


def plan_hf_pieces(source_config, key: str) -> list[tuple[int, int, int, str]]:
    """The dataset's shards as (first row, end row, estimated bytes, content hash); `lctrain.data.shards` makes
    them `Shard`s."""
    c = source_config
    ds = open_dataset(c.name, c.config, c.split, key)
    if c.field not in ds.column_names:
        raise ConfigError(f"{key}.field: {c.field!r} is not a column of {c.name}; expected one of "
                          f"{', '.join(ds.column_names)}")
    dtype = getattr(ds.features[c.field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ConfigError(f"{key}.field: column {c.field!r} of {c.name} holds {ds.features[c.field]}, not text; "
                          "expected a string column")
    fingerprint = getattr(ds, "_fingerprint", "") or c.name
    n = len(ds)
    per_row = max(1, ds.data.nbytes // max(n, 1))
    pieces = []
    for start in range(0, n, HF_SHARD_ROWS):
        end = min(n, start + HF_SHARD_ROWS)
        content = hashlib.blake2b(f"{fingerprint}:{start}:{end}".encode(), digest_size=16).hexdigest()
        pieces.append((start, end, per_row * (end - start), content))
    return pieces


def iter_rows(shard, on_bad: str, stats):
    from lctrain.data.readers import _valid_text

    ds = open_dataset(shard.files[0], shard.hf[0], shard.hf[1], shard.source)
    part = ds.select_columns([shard.text_field]).select(range(shard.start, shard.end))
    row = shard.start
    for batch in part.iter(batch_size=1024):
        for text in batch[shard.text_field]:
            row += 1
            if text is None or text == "":
                stats.empty += 1
                continue
            if not _valid_text(text):
                stats.bad(f"{shard.files[0]} row {row}", "invalid Unicode", on_bad, shard.source)
                continue
            stats.records += 1
            yield text
