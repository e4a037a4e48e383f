"""Sources: files -> documents; globs, directories, fields, limits, content hashes and one-line errors."""
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lctrain.config import ConfigError, SourceConfig
from lctrain.data import readers
from lctrain.data import sources as sources_mod
from lctrain.data.sources import Source, build_sources


def texts(source):
    return list(source.iter_texts())


def test_text_directory_is_one_document_per_file_in_sorted_order(tmp_path, write_text_files):
    paths = write_text_files(tmp_path / "corpus" / "sub", 3)
    (tmp_path / "corpus" / "notes.bin").write_bytes(b"\x00\x01")  # not a text extension: ignored
    src = Source(SourceConfig(type="text", path=str(tmp_path / "corpus")), 0, 0, tmp_path / "hf")
    assert texts(src) == [p.read_text() for p in sorted(paths)]


def test_text_glob_matches_only_its_files(tmp_path, write_text_files):
    write_text_files(tmp_path / "a", 2, suffix=".txt")
    md = write_text_files(tmp_path / "b", 2, seed=1, suffix=".md")
    src = Source(SourceConfig(type="text", path=str(tmp_path / "**" / "*.md")), 0, 0, tmp_path / "hf")
    assert src.files == sorted(md)
    assert texts(src) == [p.read_text() for p in sorted(md)]


def test_large_text_file_is_split_at_blank_lines(tmp_path, monkeypatch):
    paragraphs = [f"paragraph {i} " + "word " * 30 for i in range(40)]
    path = tmp_path / "big.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    monkeypatch.setattr(readers, "LARGE_TEXT_BYTES", 1000)
    pieces = list(sources_mod.split_large_text(path, piece_chars=600))
    assert len(pieces) > 3
    assert "".join(pieces) == path.read_text()  # nothing lost or duplicated
    for piece in pieces[:-1]:
        assert len(piece) >= 600 and piece.endswith("\n\n")  # cut right after a blank line
    # Through the source: the same documents.
    src = Source(SourceConfig(type="text", path=str(path)), 0, 0, tmp_path / "hf")
    monkeypatch.setattr(readers, "TEXT_PIECE_CHARS", 600)
    assert len(texts(src)) > 3


def test_jsonl_field_selection_and_null_rows_skipped(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "body": "first"}, {"id": 2, "body": None},
                                               {"id": 3, "body": "third"}])
    src = Source(SourceConfig(type="jsonl", path=str(path), field="body"), 0, 0, tmp_path / "hf")
    assert texts(src) == ["first", "third"]


def test_parquet_column_and_max_documents(tmp_path):
    table = pa.table({"content": [f"document number {i}" for i in range(10)], "n": list(range(10))})
    pq.write_table(table, tmp_path / "part-0.parquet")
    src = Source(SourceConfig(type="parquet", path=str(tmp_path / "*.parquet"), field="content"), 0, 4,
                 tmp_path / "hf")
    assert texts(src) == [f"document number {i}" for i in range(4)]


def test_content_hash_follows_content_not_path_or_mtime(tmp_path, write_text_files):
    paths = write_text_files(tmp_path / "c", 2)
    config = SourceConfig(type="text", path=str(tmp_path / "c"))
    before = [s.content for s in Source(config, 0, 0, tmp_path / "cache").shards()]
    assert [s.content for s in Source(config, 0, 0, tmp_path / "cache").shards()] == before
    os.utime(paths[0], (1, 1))  # touched: a memo miss, but the same content
    assert [s.content for s in Source(config, 0, 0, tmp_path / "cache").shards()] == before
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "c", copy)
    assert [s.content for s in Source(SourceConfig(type="text", path=str(copy)), 0, 0,
                                      tmp_path / "cache").shards()] == before
    paths[0].write_text("something else entirely\n")
    assert [s.content for s in Source(config, 0, 0, tmp_path / "cache").shards()] != before


def test_stdlib_source_yields_python_files(tmp_path):
    src = Source(SourceConfig(type="stdlib"), 0, 3, tmp_path / "hf")
    docs = texts(src)
    assert len(docs) == 3 and all(doc.strip() for doc in docs)
    names = [f for shard in src.shards() for f in shard.files]
    assert len(names) == 3 and names == sorted(names) and all(name.endswith(".py") for name in names)
    assert not any(part in ("test", "idlelib", "site-packages") for name in names for part in name.split("/"))


@pytest.mark.parametrize("config, message", [
    (dict(type="text", path="{tmp}/nowhere"), r"data\.sources\[1\]\.path: .*nowhere.* does not exist"),
    (dict(type="jsonl", path="{tmp}/*.jsonl"), r"data\.sources\[1\]\.path: .*matched no files"),
    (dict(type="parquet", path="{tmp}"), r"data\.sources\[1\]\.path: directory .* holds no parquet files"),
    (dict(type="text", path=""), r"data\.sources\[1\]\.path: empty"),
    (dict(type="text", path="{tmp}", weight=0.0), r"data\.sources\[1\]\.weight: 0\.0"),
])
def test_bad_paths_name_the_dotted_key(tmp_path, config, message):
    config = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in config.items()}
    with pytest.raises(ConfigError, match=message) as err:
        build_sources([SourceConfig(type="stdlib"), SourceConfig(**config)], 0, tmp_path / "hf")
    assert "\n" not in str(err.value)


def test_jsonl_without_the_field_names_the_file_and_line(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"body": "x"}])
    src = Source(SourceConfig(type="jsonl", path=str(path), field="text"), 2, 0, tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"^data\.sources\[2\]: .*d\.jsonl:2: no field 'text' \(fields: body\)"):
        texts(src)


def test_non_string_field_is_rejected_with_its_line(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, {"text": 12345}])
    src = Source(SourceConfig(type="jsonl", path=str(path)), 0, 0, tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]: .*d\.jsonl:3: field 'text' holds a int"):
        texts(src)


def test_malformed_jsonl_is_a_config_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n')
    src = Source(SourceConfig(type="jsonl", path=str(path)), 0, 0, tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]: .*bad\.jsonl:2: not JSON") as err:
        texts(src)
    assert "\n" not in str(err.value)


def test_max_documents_keeps_the_first_documents_of_a_text_source(tmp_path, write_text_files):
    paths = write_text_files(tmp_path / "c", 5)
    src = Source(SourceConfig(type="text", path=str(tmp_path / "c")), 0, 2, tmp_path / "hf")
    assert texts(src) == [p.read_text() for p in paths[:2]]
