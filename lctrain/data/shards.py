"""Cutting a source into shards and naming each shard by its content.

A shard is the unit of tokenisation and caching:
- a `jsonl` or `parquet` file; a plain `jsonl` file larger than `SHARD_BYTES` is cut into pieces of about that
  size at line ends (compressed files are one shard each: they cannot be entered in the middle);
- a group of small `text` files (each one document), or a piece of a large text file cut at a blank line;
- a group of standard-library files (`stdlib`);
- a range of rows of a Hugging Face dataset (`hf`, see `hf_source`).
Groups of small files end after a file whose *name* hashes to 0 mod `GROUP_FILES` (or at `SHARD_BYTES`), so adding
or removing a file changes only the group it falls in, not every group after it.

A shard's `content` is a BLAKE2b hash of its bytes, so a touched, renamed or copied file keeps its cache entries
and only a changed or new shard is tokenised again. Hashing reads every byte once; the hash is memoised under
`<cache_dir>/hashes/` keyed by path, size, mtime and inode, so a later start only `stat`s the files.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from lctrain.config import ConfigError, SourceConfig
from lctrain.data import readers, stdlib_source

SHARD_BYTES = 64 << 20
GROUP_FILES = 16
_ALIGN_SCAN = 1 << 20  # how far past a nominal cut a large text file is searched for a blank line
_HASH_BLOCK = 4 << 20
EXTENSIONS = {
    "text": (".txt", ".text", ".md", ".rst", ".txt.gz", ".txt.zst"),
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst"),
    "parquet": (".parquet",),
}
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Shard:
    source: str  # the dotted config key of its source, for messages
    kind: str  # text | jsonl | parquet | stdlib
    text_field: str
    files: tuple  # paths (str); a piece (start, end) always has exactly one
    start: int = 0
    end: int = -1  # exclusive byte offset; -1: the whole file(s)
    first_line: int = 1  # line number of `start`, for messages
    whole_file: bool = True  # text: each file is one document (False: cut at blank lines)
    size: int = 0  # bytes, for balancing and progress
    content: str = ""  # content hash, set by `hash_shards` (by planning for `hf`)
    hf: tuple = ()  # `hf`: (config, split)

    @property
    def label(self) -> str:
        name = self.files[0] if len(self.files) == 1 else f"{self.files[0]} (+{len(self.files) - 1} files)"
        unit = "rows" if self.kind == "hf" else "bytes"
        return name if self.end < 0 else f"{name} {unit} {self.start}-{self.end}"

    def reader_params(self) -> dict:
        """Everything besides the bytes that decides the documents."""
        params = {"kind": self.kind, "field": self.text_field if self.kind in ("jsonl", "parquet", "hf") else ""}
        if self.kind == "text":
            params["whole_file"] = self.whole_file
            params["piece_chars"] = readers.TEXT_PIECE_CHARS
        return params

    def read(self, on_bad: str, stats: readers.ReadStats):
        """The shard's documents in order (see `readers`)."""
        for path in self.files:
            if self.kind == "jsonl":
                yield from readers.iter_jsonl(path, self.start, self.end, self.first_line, self.text_field, on_bad,
                                              self.source, stats)
            elif self.kind == "text":
                yield from readers.iter_text(path, self.start, self.end, self.first_line, self.whole_file, on_bad,
                                             self.source, stats)
            elif self.kind == "hf":
                from lctrain.data.hf_source import iter_rows
                yield from iter_rows(self, on_bad, stats)
                return
            elif self.kind == "parquet":
                yield from readers.iter_parquet(path, self.text_field, on_bad, self.source, stats)
            else:
                yield from readers.iter_stdlib_file(path, stats)


# ----------------------------------------------------------------------------------------------- files
def resolve_files(source: SourceConfig, key: str) -> list[Path]:
    """The sorted files a `text`/`jsonl`/`parquet` source reads. `key` is its dotted config name for errors."""
    pattern = source.path
    if _GLOB_CHARS.intersection(pattern):
        files = []
        for path in (Path(p) for p in glob.glob(pattern, recursive=True)):
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


# ----------------------------------------------------------------------------------------------- planning
def plan_shards(config: SourceConfig, key: str, files: list[Path], max_documents: int = 0) -> list[Shard]:
    """The source's shards in document order (content hashes not yet filled in: see `hash_shards`)."""
    kind = config.type
    if kind == "hf":
        from lctrain.data.hf_source import plan_hf_pieces
        return [Shard(key, "hf", config.field, (config.name,), start, end, size=size, content=content,
                      hf=(config.config, config.split)) for start, end, size, content in plan_hf_pieces(config, key)]
    if kind == "stdlib":
        return _groups(kind, key, "", [str(p) for p in stdlib_source.stdlib_files(max_documents)])
    shards: list[Shard] = []
    small: list[str] = []
    for path in map(str, files):
        size = os.path.getsize(path)
        if kind == "text" and size <= readers.LARGE_TEXT_BYTES:
            small.append(path)
            continue
        shards.extend(_groups(kind, key, config.field, small))
        small = []
        whole = kind != "text"
        if readers.is_compressed(path) or kind == "parquet" or size <= SHARD_BYTES:
            shards.append(Shard(key, kind, config.field, (path,), whole_file=whole, size=size))
        else:
            for start, end in _cuts(path, size, blank_line=kind == "text"):
                shards.append(Shard(key, kind, config.field, (path,), start, end, whole_file=whole,
                                    size=end - start))
    shards.extend(_groups(kind, key, config.field, small))
    return shards


def _groups(kind: str, key: str, text_field: str, paths: list[str]) -> list[Shard]:
    groups, current, size = [], [], 0
    for path in paths:
        current.append(path)
        size += os.path.getsize(path)
        name_hash = int.from_bytes(hashlib.blake2b(os.path.basename(path).encode(), digest_size=8).digest(), "little")
        if name_hash % GROUP_FILES == 0 or size >= SHARD_BYTES:
            groups.append(Shard(key, kind, text_field, tuple(current), size=size))
            current, size = [], 0
    if current:
        groups.append(Shard(key, kind, text_field, tuple(current), size=size))
    return groups


def _cuts(path: str, size: int, blank_line: bool) -> list[tuple[int, int]]:
    """Byte ranges of about `SHARD_BYTES`, each ending right after a newline (a blank line for text, when one
    comes within `_ALIGN_SCAN`)."""
    cuts, start = [], 0
    with open(path, "rb") as handle:
        while start < size:
            nominal = start + SHARD_BYTES
            if nominal >= size:
                cuts.append((start, size))
                break
            handle.seek(nominal)
            window = handle.read(_ALIGN_SCAN)
            at = window.find(b"\n\n") + 2 if blank_line and b"\n\n" in window else -1
            if at < 0:
                newline = window.find(b"\n")
                while newline < 0 and window:  # a line longer than the scan window: keep reading
                    more = handle.read(_ALIGN_SCAN)
                    if not more:
                        break
                    newline = len(window) + more.find(b"\n") if b"\n" in more else -1
                    window += more
                at = newline + 1 if newline >= 0 else size - nominal
            end = min(size, nominal + at)
            cuts.append((start, end))
            start = end
    return cuts


# ----------------------------------------------------------------------------------------------- hashing
def hash_shards(shards: list[Shard], memo_dir: Path) -> list[Shard]:
    """The shards with `content` set and `first_line` set for pieces (newlines before the piece + 1)."""
    out, lines_before, previous_file = [], 0, None
    for shard in shards:
        if shard.content:  # keyed at planning (hf)
            out.append(shard)
            continue
        digest, newlines = _content(shard, Path(memo_dir))
        if shard.files[0] != previous_file or shard.start == 0:
            lines_before = 0
        previous_file = shard.files[0]
        out.append(replace(shard, content=digest, first_line=lines_before + 1))
        lines_before += newlines
    return out


def _content(shard: Shard, memo_dir: Path) -> tuple[str, int]:
    stats = [[str(Path(p).resolve()), st.st_size, st.st_mtime_ns, st.st_ino] for p in shard.files
             for st in [os.stat(p)]]
    memo_key = hashlib.blake2b(json.dumps([stats, shard.start, shard.end]).encode(), digest_size=16).hexdigest()
    memo = memo_dir / memo_key[:2] / memo_key
    try:
        digest, newlines = memo.read_text().split()
        return digest, int(newlines)
    except (OSError, ValueError):
        pass
    hasher = hashlib.blake2b(digest_size=16)
    newlines = 0
    for path in shard.files:
        with open(path, "rb") as handle:
            handle.seek(shard.start)
            remaining = shard.end - shard.start if shard.end >= 0 else -1
            while remaining != 0:
                block = handle.read(_HASH_BLOCK if remaining < 0 else min(_HASH_BLOCK, remaining))
                if not block:
                    break
                hasher.update(block)
                newlines += block.count(b"\n")
                if remaining > 0:
                    remaining -= len(block)
        if len(shard.files) > 1:
            hasher.update(b"\0file\0")  # file boundaries are document boundaries
    digest = hasher.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"{memo.name}.{os.getpid()}")
    tmp.write_text(f"{digest} {newlines}")
    os.replace(tmp, memo)
    return digest, newlines
