"""Bad data: one line naming the file and line (exit 2), or skipped and counted with data.on_bad_record=skip."""
import gzip
import json

import numpy as np
import pytest

from lctrain.cli import main
from lctrain.data import build_data, shard_cache
from lctrain.data.readers import BadRecord

GOOD = [json.dumps({"text": f"river stone cloud {i} light night code"}) for i in range(20)]

CASES = {
    "not_json": (b"{not json}\n", r"bad\.jsonl:3: not JSON"),
    "missing_field": (json.dumps({"body": "x"}).encode() + b"\n", r"bad\.jsonl:3: no field 'text' \(fields: body\)"),
    "number": (json.dumps({"text": 12345}).encode() + b"\n", r"bad\.jsonl:3: field 'text' holds a int"),
    "not_utf8": (b'{"text": "caf\xe9"}\n', r"bad\.jsonl:3: not UTF-8 text \(byte 0xe9"),
    "surrogate": (b'{"text": "a\\ud800b"}\n', r"bad\.jsonl:3: field 'text' holds invalid Unicode"),
    "binary": (b"\x00\x01\x02\xff\xfe" * 20 + b"\n", r"bad\.jsonl:3: not UTF-8"),
    "array": (b"[1, 2]\n", r"bad\.jsonl:3: a JSON list"),
}


def write_bad(directory, record: bytes):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "a.jsonl").write_text("\n".join(GOOD) + "\n")
    (directory / "bad.jsonl").write_bytes(("\n".join(GOOD[:2]) + "\n").encode() + record + GOOD[3].encode() + b"\n")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_is_one_line_with_file_and_line_and_exit_2(tmp_path, make_cfg, capsys, case):
    record, message = CASES[case]
    write_bad(tmp_path / "corpus", record)
    cfg = make_cfg([{"type": "jsonl", "path": str(tmp_path / "corpus")}], "data.num_workers=1")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(cfg.to_yaml())
    assert main(["prepare", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("error: data.sources[0]: ")
    import re
    assert re.search(message, err), err


def test_skip_counts_bad_records_and_a_later_strict_run_still_refuses(tmp_path, make_cfg):
    write_bad(tmp_path / "corpus", b"{not json}\n")
    (tmp_path / "corpus" / "c.jsonl").write_text(json.dumps({"other": 1}) + "\n" + GOOD[5] + "\n")
    sources = [{"type": "jsonl", "path": str(tmp_path / "corpus")}]
    data = build_data(make_cfg(sources, "data.num_workers=1", "data.on_bad_record=skip"), progress=False)
    assert data.bad_records == {"data.sources[0]": 2}
    assert "skipped 2 bad records" in data.summary()
    assert data.plan["train_docs"] + data.plan["eval_docs"] == 20 + 3 + 1
    with pytest.raises(BadRecord, match=r"bad\.jsonl:3: not JSON .*data\.on_bad_record=skip"):
        build_data(make_cfg(sources, "data.num_workers=1"), progress=False)


def test_compressed_shards_are_found_in_directory_mode(tmp_path, make_cfg):
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    text = "\n".join(GOOD) + "\n"
    (plain / "a.jsonl").write_text(text)
    with gzip.open(packed / "a.jsonl.gz", "wt") as handle:
        handle.write(text)
    model = build_data(make_cfg([{"type": "jsonl", "path": str(plain)}], "data.num_workers=1"),
                       progress=False).tokenizer.save(tmp_path / "tok")
    a = build_data(make_cfg([{"type": "jsonl", "path": str(plain)}], "data.num_workers=1",
                            f"data.tokenizer={model}"), progress=False)
    b = build_data(make_cfg([{"type": "jsonl", "path": str(packed)}], "data.num_workers=1",
                            f"data.tokenizer={model}"), progress=False)
    assert len(b.tokens[0].train) == len(a.tokens[0].train) > 0
    assert all(np.array_equal(a.tokens[0].train.document(i), b.tokens[0].train.document(i))
               for i in range(len(a.tokens[0].train)))


def test_a_long_document_is_encoded_in_pieces_with_the_same_tokens(tmp_path, make_cfg, monkeypatch):
    line = " ".join(f"token{i % 97} window" for i in range(3000))
    text = "\n".join([line[:400]] * 60)  # ~24 K characters with newlines to cut at
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": text}) + "\n" + GOOD[0] + "\n")
    monkeypatch.setattr(shard_cache, "LONG_DOC_CHARS", 1000)  # pieces of <= 1000 characters
    calls = []
    data = build_data(make_cfg([{"type": "jsonl", "path": str(tmp_path / "long.jsonl")}], "data.num_workers=1",
                               "data.eval_fraction=0"), progress=False)
    tok = data.tokenizer
    original = tok.encode
    monkeypatch.setattr(type(tok), "encode", lambda self, t: calls.append(len(t)) or original(t))
    docs = [data.tokens[0].train.document(i).tolist() for i in range(2)]
    assert original(text) in docs
    # Build again into a fresh cache and watch the piece sizes.
    build_data(make_cfg([{"type": "jsonl", "path": str(tmp_path / "long.jsonl")}], "data.num_workers=1",
                        "data.eval_fraction=0", f"data.cache_dir={tmp_path / 'c2'}",
                        f"data.tokenizer={tok.save(tmp_path / 'tok')}"), progress=False)
    assert calls and max(calls) <= 1000 and sum(calls) == len(text)
