"""Reading the documents of one shard, record by record, with the file and line (or row) of each.

A shard (see `shards`) is a list of whole files or a byte range of one big file. The readers here turn it into
document strings and check every record: a record that cannot be a document (bytes that are not UTF-8, a line that
is not a JSON object, a missing field, a number where text is expected, a string with lone surrogates) raises
`BadRecord` naming the file and line/row, or, with `on_bad="skip"`, is counted in `ReadStats` and skipped.
Empty or null documents are not errors: they are counted as `empty` and skipped.

Compressed inputs (`.gz`, `.zst`; `.zst` needs the `zstandard` package) are read as streams. Parquet is read one
row group at a time, so memory stays bounded by the largest row group, not the file.
"""
from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lctrain.config import ConfigError

LARGE_TEXT_BYTES = 1 << 20  # a text file above this is a corpus cut at blank lines, not one document
TEXT_PIECE_CHARS = 64 * 1024  # target size of the documents cut from a large text file
MAX_BAD_EXAMPLES = 5  # bad records remembered (file:line and reason) for the summary


class BadRecord(ConfigError):
    """A record that cannot be a document; the message names the file and line or row."""


@dataclass
class ReadStats:
    records: int = 0  # documents yielded
    empty: int = 0  # empty or null documents skipped
    skipped: int = 0  # bad records skipped (on_bad="skip")
    examples: list = field(default_factory=list)  # first bad records: "file:line N: reason"

    def bad(self, where: str, what: str, on_bad: str, key: str) -> None:
        if on_bad != "skip":
            raise BadRecord(f"{key}: {where}: {what}; fix or remove the record, or set data.on_bad_record=skip")
        self.skipped += 1
        if len(self.examples) < MAX_BAD_EXAMPLES:
            self.examples.append(f"{where}: {what}")


def open_binary(path: str):
    """A binary file object, decompressing `.gz` / `.zst` transparently."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ConfigError(f"{path}: reading .zst files needs the zstandard package (pip install zstandard)") \
                from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def is_compressed(path: str) -> bool:
    return path.endswith((".gz", ".zst"))


def _iter_lines(path: str, start: int, end: int) -> Iterator[bytes]:
    """Lines (with their newline) of bytes `start:end` of `path` (end < 0: to the end of the file)."""
    with open_binary(path) as handle:
        if start:
            handle.seek(start)
        remaining = end - start if end >= 0 else -1
        for line in handle:
            if remaining >= 0:
                if remaining <= 0:
                    return
                if len(line) > remaining:  # ranges are cut at line ends; never reached in practice
                    line = line[:remaining]
                remaining -= len(line)
            yield line


def _valid_text(text: str) -> bool:
    """False for strings sentencepiece cannot encode (lone surrogates, e.g. from a JSON "\\ud800" escape)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def iter_jsonl(path: str, start: int, end: int, first_line: int, text_field: str, on_bad: str, key: str,
               stats: ReadStats) -> Iterator[str]:
    for number, raw in enumerate(_iter_lines(path, start, end), start=first_line):
        where = f"{path}:{number}"
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            stats.bad(where, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", on_bad, key)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            stats.bad(where, f"not JSON ({exc.msg} at column {exc.colno})", on_bad, key)
            continue
        if not isinstance(row, dict):
            stats.bad(where, f"a JSON {type(row).__name__}, expected an object with a {text_field!r} field",
                      on_bad, key)
            continue
        if text_field not in row:
            shown = ", ".join(list(row)[:8]) or "none"
            stats.bad(where, f"no field {text_field!r} (fields: {shown}); set {key}.field", on_bad, key)
            continue
        text = row[text_field]
        if text is None or text == "":
            stats.empty += 1
            continue
        if not isinstance(text, str):
            stats.bad(where, f"field {text_field!r} holds a {type(text).__name__}, expected a string", on_bad, key)
            continue
        if not _valid_text(text):
            stats.bad(where, f"field {text_field!r} holds invalid Unicode (a lone surrogate escape)", on_bad, key)
            continue
        stats.records += 1
        yield text


def _decode_text_file(data: bytes, path: str, first_line: int, on_bad: str, key: str,
                      stats: ReadStats) -> str | None:
    """The file's text, or None (after `stats.bad`) when it is binary or not UTF-8."""
    if b"\0" in data:
        line = first_line + data[:data.index(b"\0")].count(b"\n")
        stats.bad(f"{path}:{line}", "a NUL byte: a binary file, not text", on_bad, key)
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data[:exc.start].count(b"\n")
        stats.bad(f"{path}:{line}", f"not UTF-8 text (byte 0x{data[exc.start]:02x})", on_bad, key)
        return None


def split_text(lines, piece_chars: int | None = None) -> Iterator[str]:
    """Join `lines` into documents of >= `piece_chars` (default `TEXT_PIECE_CHARS`) characters that end at a blank
    line (the last one may be shorter). A stretch with no blank line is cut at a line end at 8x `piece_chars`."""
    piece_chars = piece_chars or TEXT_PIECE_CHARS
    pending: list[str] = []
    size = 0
    for line in lines:
        pending.append(line)
        size += len(line)
        at_blank = not line.strip()
        if (at_blank and size >= piece_chars) or size >= 8 * piece_chars:
            text = "".join(pending)
            if text.strip():
                yield text
            pending, size = [], 0
    text = "".join(pending)
    if text.strip():
        yield text


def split_large_text(path: Path, piece_chars: int | None = None) -> Iterator[str]:
    """A whole big text file as documents (see `split_text`); undecodable bytes are replaced."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        yield from split_text(handle, piece_chars)


def iter_text(path: str, start: int, end: int, first_line: int, whole_file: bool, on_bad: str, key: str,
              stats: ReadStats) -> Iterator[str]:
    """A text file (or range): one document when `whole_file`, else cut at blank lines (see `split_text`)."""
    if whole_file:
        with open_binary(path) as handle:
            data = handle.read()
    else:
        data = b"".join(_iter_lines(path, start, end))
    text = _decode_text_file(data, path, first_line, on_bad, key, stats)
    if text is None:
        return
    del data
    texts = [text] if whole_file else split_text(text.splitlines(keepends=True))
    for doc in texts:
        if not doc.strip():
            stats.empty += 1
            continue
        stats.records += 1
        yield doc


def iter_stdlib_file(path: str, stats: ReadStats) -> Iterator[str]:
    """A standard-library file: undecodable bytes replaced, so no installation can break the default corpus."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if text.strip():
        stats.records += 1
        yield text
    else:
        stats.empty += 1


def iter_parquet(path: str, text_field: str, on_bad: str, key: str, stats: ReadStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise BadRecord(f"{key}: {path}: not a parquet file ({str(exc).splitlines()[0] if str(exc) else exc!r})") \
            from None
    schema = handle.schema_arrow
    if text_field not in schema.names:
        raise BadRecord(f"{key}.field: {text_field!r} is not a column of {path}; expected one of "
                        f"{', '.join(schema.names) or '(no columns)'}")
    column_type = str(schema.field(text_field).type)
    if column_type not in ("string", "large_string"):
        raise BadRecord(f"{key}.field: column {text_field!r} of {path} holds {column_type}, not text; expected a "
                        "string column")
    row = 0
    for group in range(handle.num_row_groups):
        for text in handle.read_row_group(group, columns=[text_field]).column(0).to_pylist():
            row += 1
            if text is None or text == "":
                stats.empty += 1
                continue
            if not _valid_text(text):
                stats.bad(f"{path} row {row}", "invalid Unicode", on_bad, key)
                continue
            stats.records += 1
            yield text
