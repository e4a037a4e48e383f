"""Document sources: `data.sources[i]` -> a Hugging Face `datasets.Dataset` with one string column, `text`.

Source types (each reads local files only; `datasets` does the reading and keeps its Arrow cache under
`<cache_dir>/hf/`):
- `text`: every matched file is one document. A file larger than `LARGE_TEXT_BYTES` (1 MiB) is treated as a
  corpus rather than a document: it is cut at blank lines into documents of about `TEXT_PIECE_CHARS` characters
  (64 Ki, some ten thousand tokens) so that a single big `.txt` still gives many documents to shuffle and to hold
  out. A blank-line block is never split, unless it runs past 8x that size without a blank line, in which case it
  is cut at a line end. Want one document per paragraph? Write a jsonl file.
- `jsonl`: one JSON object per line; the document is the string in `field` (default `text`).
- `parquet`: the document is the string column `field`.
- `stdlib`: the Python standard library's source files (see `stdlib_source`); `path` is unused.
- `mqar`, `passkey`: generated from a seed (see `synthetic`); `path` is unused.

`path` is a file, a directory (searched recursively for the type's extensions, see `EXTENSIONS`) or a glob
(`data/**/*.jsonl`). Files are taken in sorted order so the document order does not depend on the file system.
Empty or missing (null) documents are skipped. `data.max_documents > 0` keeps the first N documents of each source.
"""
from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import Iterator

from lctrain.config import SYNTHETIC_SOURCES, ConfigError, SourceConfig
from lctrain.data import stdlib_source

LARGE_TEXT_BYTES = 1 << 20
TEXT_PIECE_CHARS = 64 * 1024
EXTENSIONS = {
    "text": (".txt", ".text", ".md", ".rst"),
    "jsonl": (".jsonl", ".json"),
    "parquet": (".parquet",),
}
_GLOB_CHARS = set("*?[")


def resolve_files(source: SourceConfig, key: str) -> list[Path]:
    """The sorted files a `text`/`jsonl`/`parquet` source reads. `key` is its dotted config name for errors."""
    pattern = source.path
    if _GLOB_CHARS.intersection(pattern):
        matched = [Path(p) for p in glob.glob(pattern, recursive=True)]
        files = []
        for path in matched:
            files.extend(_files_in(path, source.type) if path.is_dir() else [path] if path.is_file() else [])
        if not files:
            raise ConfigError(f"{key}.path: {pattern!r} matched no files; expected a glob matching "
                              f"{source.type} files")
        return sorted(set(files))
    path = Path(pattern)
    if not path.exists():
        raise ConfigError(f"{key}.path: {pattern!r} does not exist; expected a file, directory or glob")
    if path.is_file():
        return [path]
    files = _files_in(path, source.type)
    if not files:
        raise ConfigError(f"{key}.path: directory {pattern!r} holds no {source.type} files; expected files "
                          f"ending in {', '.join(EXTENSIONS[source.type])}")
    return files


def _files_in(directory: Path, kind: str) -> list[Path]:
    suffixes = EXTENSIONS[kind]
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.name.endswith(suffixes) and not p.name.startswith("."))


class Source:
    """One configured source: knows its files and fingerprint cheaply, loads its documents only when asked.

    Nothing is read at construction beyond `stat`, so a run whose tokenizer and token caches exist never opens
    the data files at all.
    """

    def __init__(self, config: SourceConfig, index: int, max_documents: int, hf_cache_dir: Path):
        self.config = config
        self.index = index
        self.key = f"data.sources[{index}]"
        self.max_documents = max_documents
        self.hf_cache_dir = Path(hf_cache_dir)
        if config.type not in ("text", "jsonl", "parquet", "stdlib"):
            raise ConfigError(f"{self.key}.type: {config.type!r} is not allowed; expected one of "
                              "'text', 'jsonl', 'parquet', 'stdlib'")
        self.files = [] if config.type == "stdlib" else resolve_files(config, self.key)
        self._dataset = None
        self._fingerprint = None

    @property
    def weight(self) -> float:
        return self.config.weight

    def describe(self) -> dict:
        """What identifies the documents: type, column, limit and every file's path, size and mtime."""
        if self.config.type == "stdlib":
            items = [list(item) for item in stdlib_source.stdlib_fingerprint_items(self.max_documents)]
        else:
            items = []
            for path in self.files:
                stat = path.stat()
                items.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        field = self.config.field if self.config.type in ("jsonl", "parquet") else ""
        described = {"type": self.config.type, "field": field, "max_documents": self.max_documents, "files": items}
        if self.config.type == "text":  # how big files are cut is part of what the documents are
            described["split"] = [LARGE_TEXT_BYTES, TEXT_PIECE_CHARS]
        return described

    def fingerprint(self) -> str:
        """Hash of `describe()`, computed once per run."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:20]
        return self._fingerprint

    def dataset(self):
        """The documents as a `datasets.Dataset` with a single `text` column (loaded once, then memoised)."""
        if self._dataset is None:
            self._dataset = self._load()
        return self._dataset

    def iter_texts(self, batch_size: int = 256) -> Iterator[str]:
        """Every non-empty document in order."""
        for batch in self.dataset().iter(batch_size=batch_size):
            for text in batch["text"]:
                if text:
                    yield text

    # ------------------------------------------------------------------------------------------- loading
    def _load(self):
        import datasets

        kind = self.config.type
        try:
            if kind in ("text", "stdlib"):
                generator = _text_rows if kind == "text" else _stdlib_rows
                kwargs = {"limit": self.max_documents}
                if kind == "text":
                    kwargs["files"] = [str(p) for p in self.files]
                ds = datasets.Dataset.from_generator(
                    generator, gen_kwargs=kwargs, features=datasets.Features({"text": datasets.Value("string")}),
                    cache_dir=str(self.hf_cache_dir), fingerprint=self.fingerprint())
            else:
                builder = "json" if kind == "jsonl" else "parquet"
                ds = datasets.load_dataset(builder, data_files=[str(p) for p in self.files], split="train",
                                           cache_dir=str(self.hf_cache_dir))
        except ConfigError:
            raise
        except Exception as exc:  # datasets wraps parse errors in several exception types
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"{self.key}.path: cannot read {self.config.path!r} as {kind}: {first_line}") from None
        if kind in ("jsonl", "parquet"):
            ds = self._select_field(ds)
        if self.max_documents and len(ds) > self.max_documents:
            ds = ds.select(range(self.max_documents))
        return ds

    def _select_field(self, ds):
        field = self.config.field
        if field not in ds.column_names:
            raise ConfigError(f"{self.key}.field: {field!r} is not a column of {self.config.path!r}; expected one "
                              f"of {', '.join(ds.column_names) or '(no columns)'}")
        feature = ds.features[field]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise ConfigError(f"{self.key}.field: column {field!r} of {self.config.path!r} holds {feature}, "
                              "not text; expected a string column")
        ds = ds.select_columns([field])
        return ds.rename_column(field, "text") if field != "text" else ds


def _stdlib_rows(limit: int) -> Iterator[dict]:
    for text in stdlib_source.iter_stdlib_documents(limit):
        yield {"text": text}


def _text_rows(files: list[str], limit: int) -> Iterator[dict]:
    """Documents of the text files; stops after `limit` documents (0: no limit) without reading the rest."""
    count = 0
    for name in files:
        path = Path(name)
        if path.stat().st_size <= LARGE_TEXT_BYTES:
            texts = [path.read_text(encoding="utf-8", errors="replace")]
        else:
            texts = split_large_text(path)
        for text in texts:
            if not text.strip():
                continue
            yield {"text": text}
            count += 1
            if count == limit:
                return


def split_large_text(path: Path, piece_chars: int | None = None) -> Iterator[str]:
    """Stream a big text file as documents of >= `piece_chars` (default `TEXT_PIECE_CHARS`) characters that end
    at a blank line (the last one may be shorter). A stretch with no blank line is cut at a line end once it
    reaches 8x `piece_chars`."""
    piece_chars = piece_chars or TEXT_PIECE_CHARS
    lines: list[str] = []
    size = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            lines.append(line)
            size += len(line)
            at_blank = not line.strip()
            if (at_blank and size >= piece_chars) or size >= 8 * piece_chars:
                text = "".join(lines)
                if text.strip():
                    yield text
                lines, size = [], 0
    text = "".join(lines)
    if text.strip():
        yield text


def build_sources(configs: list, max_documents: int, hf_cache_dir: Path) -> list[Source]:
    """`data.sources` -> `Source` objects (paths resolved and checked now, data read later)."""
    if not configs:
        raise ConfigError("data.sources: empty; expected at least one source")
    sources = []
    for i, config in enumerate(configs):
        if isinstance(config, dict):  # a Config built in code rather than through load_config
            config = SourceConfig(**config)
        if config.weight <= 0:
            raise ConfigError(f"data.sources[{i}].weight: {config.weight!r} is not allowed; expected a positive "
                              "number")
        if config.type in SYNTHETIC_SOURCES:  # generated from a seed: see `lctrain.data.synthetic`
            from lctrain.data.synthetic import SyntheticSource
            sources.append(SyntheticSource(config, i, max_documents))
            continue
        if config.type != "stdlib" and not config.path:
            raise ConfigError(f"data.sources[{i}].path: empty; a {config.type!r} source needs a file, directory "
                              "or glob")
        sources.append(Source(config, i, max_documents, hf_cache_dir))
    return sources
