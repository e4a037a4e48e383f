"""Document sources: `data.sources[i]` (and `data.eval_sources[i]`) -> shards of documents, read lazily.

Source types (local files, read by `readers` one record at a time; no copy of the raw text is kept):
- `text`: every matched file is one document. A file larger than `readers.LARGE_TEXT_BYTES` (1 MiB) is treated as
  a corpus rather than a document: it is cut at blank lines into documents of about `readers.TEXT_PIECE_CHARS`
  characters (64 Ki) so that a single big `.txt` still gives many documents to shuffle and to hold out. A
  blank-line block is never split, unless it runs past 8x that size without a blank line, in which case it is cut
  at a line end. Want one document per paragraph? Write a jsonl file.
- `jsonl`: one JSON object per line; the document is the string in `field` (default `text`).
- `parquet`: the document is the string column `field`.
- `stdlib`: the Python standard library's source files (see `stdlib_source`); `path` is unused.
- `hf`: a Hugging Face dataset by `name` (local cache) or `save_to_disk` directory, `config`, `split`, `field`
  (see `hf_source`); `path` is unused.
- `mqar`, `passkey`: generated from a seed (see `synthetic`); `path` is unused.

`path` is a file, a directory (searched recursively for the type's extensions, compressed ones included: see
`shards.EXTENSIONS`) or a glob (`data/**/*.jsonl`). Files are taken in sorted order so the document order does not
depend on the file system. Empty or null documents are skipped. `data.max_documents > 0` keeps the first N
documents of each source. How sources become shards and cache keys: see `shards`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lctrain.config import SYNTHETIC_SOURCES, ConfigError, SourceConfig
from lctrain.data import readers
from lctrain.data.readers import LARGE_TEXT_BYTES, TEXT_PIECE_CHARS, split_large_text  # noqa: F401 (re-exported)
from lctrain.data.shards import EXTENSIONS, Shard, hash_shards, plan_shards, resolve_files  # noqa: F401

_FILE_TYPES = ("text", "jsonl", "parquet", "stdlib", "hf")


class Source:
    """One configured source: knows its files cheaply, plans and hashes its shards when first asked.

    Nothing is read at construction beyond `stat`. `cache_dir` holds the content-hash memo (`hashes/`).
    """

    def __init__(self, config: SourceConfig, index: int, max_documents: int, cache_dir: Path,
                 section: str = "data.sources"):
        self.config = config
        self.index = index
        self.key = f"{section}[{index}]"
        self.max_documents = max_documents
        self.cache_dir = Path(cache_dir)
        if config.type not in _FILE_TYPES:
            raise ConfigError(f"{self.key}.type: {config.type!r} is not allowed; expected one of "
                              f"{', '.join(map(repr, _FILE_TYPES + SYNTHETIC_SOURCES))}")
        self.files = [] if config.type in ("stdlib", "hf") else resolve_files(config, self.key)
        self._shards = None
        self._planned = None
        self.hash_content = True

    @property
    def weight(self) -> float:
        return self.config.weight

    def planned_shards(self) -> list[Shard]:
        """The source's shards in document order, without reading them (no content hashes, except `hf`)."""
        if self._planned is None:
            self._planned = plan_shards(self.config, self.key, self.files, self.max_documents)
        return self._planned

    def shards(self) -> list[Shard]:
        """The source's shards in document order, with content hashes (memoised per run); only planned when
        `hash_content` is off (streaming reads each shard once, so hashing would read everything twice)."""
        if not self.hash_content:
            return self.planned_shards()
        if self._shards is None:
            self._shards = hash_shards(self.planned_shards(), self.cache_dir / "hashes")
        return self._shards

    def iter_texts(self, on_bad: str = "error") -> Iterator[str]:
        """Every non-empty document in order (the first `max_documents` when set)."""
        count = 0
        for shard in self.shards():
            for text in shard.read(on_bad, readers.ReadStats()):
                yield text
                count += 1
                if count == self.max_documents:
                    return

    def sample_texts(self, budget: int, on_bad: str = "error") -> Iterator[str]:
        """Up to `budget` characters of documents for the tokenizer: shards in order of their content hash (so
        adding a shard seldom changes the sample), at most a `1 / min(8, n)` share of the budget from each on a
        first pass, then the rest of the budget from where each shard stopped."""
        shards = sorted(self.shards(), key=lambda s: (s.content, s.start))
        used = [0] * len(shards)  # documents of each shard already in the sample
        cap = max(1, budget // max(1, min(8, len(shards))))
        for _ in range(2):
            for k, shard in enumerate(shards):
                taken = 0
                for n, text in enumerate(shard.read(on_bad, readers.ReadStats())):
                    if n < used[k]:
                        continue
                    text = text[:min(budget, cap - taken)]
                    budget -= len(text)
                    taken += len(text)
                    used[k] = n + 1
                    yield text
                    if budget <= 0 or taken >= cap:
                        break
                if budget <= 0:
                    return
            cap = budget


def build_sources(configs: list, max_documents: int, cache_dir: Path, section: str = "data.sources") -> list:
    """`data.sources` (or `data.eval_sources`) -> `Source` / `SyntheticSource` objects (paths checked now)."""
    if not configs and section == "data.sources":
        raise ConfigError("data.sources: empty; expected at least one source")
    sources = []
    for i, config in enumerate(configs):
        if isinstance(config, dict):  # a Config built in code rather than through load_config
            config = SourceConfig(**config)
        if config.weight <= 0:
            raise ConfigError(f"{section}[{i}].weight: {config.weight!r} is not allowed; expected a positive "
                              "number")
        if config.type in SYNTHETIC_SOURCES:  # generated from a seed: see `lctrain.data.synthetic`
            from lctrain.data.synthetic import SyntheticSource
            source = SyntheticSource(config, i, max_documents)
            source.key = f"{section}[{i}]"
            sources.append(source)
            continue
        if config.type == "hf" and not config.name:
            raise ConfigError(f"{section}[{i}].name: empty; an 'hf' source needs a dataset name or a save_to_disk "
                              "directory")
        if config.type not in ("stdlib", "hf") and not config.path:
            raise ConfigError(f"{section}[{i}].path: empty; a {config.type!r} source needs a file, directory "
                              "or glob")
        sources.append(Source(config, i, max_documents, cache_dir, section))
    return sources
