"""Per-shard token cache: content keys, incremental builds, worker processes, ranks sharing, failures, cleanup."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from lctrain.data import build_data, shard_cache
from lctrain.data.build import prepare_shards
from lctrain.data.parallel_build import deal
from lctrain.data.readers import BadRecord
from lctrain.data.sources import build_sources
from lctrain.data.tokenizer import get_tokenizer
from tests.data.textgen import random_text

import random


def write_corpus(directory, n_files, rows=12, seed=0):
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [json.dumps({"text": random_text(rng, rng.randint(5, 40))}) for _ in range(rows)]
        (directory / f"part-{i:03d}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def jsonl_cfg(tmp_path, make_cfg):
    def make(path, *overrides):
        return make_cfg([{"type": "jsonl", "path": str(path)}], "data.num_workers=1",
                        "data.tokenizer_sample_chars=4000", *overrides)
    return make


def built(data):
    return data.plan["build"]["built"]


def shard_entries(cfg):
    root = cfg.data.cache_dir + "/shards"
    return sorted(p for p in os.listdir(root) if not p.endswith(".lock"))


def batches(data, n=4):
    return [next(data.train) for _ in range(n)]


def test_only_new_or_changed_shards_are_tokenised(tmp_path, jsonl_cfg):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, 4)
    cfg = jsonl_cfg(corpus)
    first = build_data(cfg, progress=False)
    assert built(first) == 4 and len(shard_entries(cfg)) == 4
    assert built(build_data(cfg, progress=False)) == 0
    os.utime(corpus / "part-001.jsonl", (1, 1))  # touched: same content, nothing to do
    moved = tmp_path / "moved"
    shutil.copytree(corpus, moved)  # copied elsewhere: same content, nothing to do
    again = build_data(jsonl_cfg(moved), progress=False)
    assert built(again) == 0
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches(first), batches(again)) for k in a)
    # Pin the tokenizer so the new shard cannot change it (see Source.sample_texts for the unpinned case).
    model = first.tokenizer.save(tmp_path / "tok")
    pinned = jsonl_cfg(corpus, f"data.tokenizer={model}")
    assert built(build_data(pinned, progress=False)) == 0  # same tokenizer content: same keys
    write_corpus(tmp_path / "extra", 1, seed=7)
    shutil.copy(tmp_path / "extra" / "part-000.jsonl", corpus / "part-004.jsonl")
    assert built(build_data(pinned, progress=False)) == 1
    (corpus / "part-002.jsonl").write_text(json.dumps({"text": "changed"}) + "\n")
    assert built(build_data(pinned, progress=False)) == 1


def test_worker_processes_give_the_same_cache_as_one_process(tmp_path, jsonl_cfg):
    write_corpus(tmp_path / "corpus", 3)
    one = build_data(jsonl_cfg(tmp_path / "corpus", f"data.cache_dir={tmp_path / 'c1'}"), progress=False)
    two = build_data(jsonl_cfg(tmp_path / "corpus", f"data.cache_dir={tmp_path / 'c2'}", "data.num_workers=2"),
                     progress=False)
    assert built(one) == built(two) == 3
    for name in shard_entries(one_cfg := jsonl_cfg(tmp_path / "corpus", f"data.cache_dir={tmp_path / 'c1'}")):
        a, b = tmp_path / "c1" / "shards" / name, tmp_path / "c2" / "shards" / name
        assert (a / "tokens.bin").read_bytes() == (b / "tokens.bin").read_bytes()
        assert np.array_equal(np.load(a / "offsets.npy"), np.load(b / "offsets.npy"))
    assert one_cfg.data.cache_dir.endswith("c1")


def test_ranks_share_the_missing_shards_and_build_each_once(tmp_path, jsonl_cfg):
    write_corpus(tmp_path / "corpus", 6)
    cfg = jsonl_cfg(tmp_path / "corpus")
    cache = tmp_path / "cache"
    sources = build_sources(cfg.data.sources, 0, cache)
    tokenizer = get_tokenizer(cfg.data, sources, cache)
    results, errors = {}, []

    def rank(r):
        try:
            results[r] = prepare_shards(sources, tokenizer, cache, "error", 1, r, 2, False)[1]["build"]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results[0]["built"] + results[1]["built"] == 6  # every shard once, by one of the two
    assert results[0]["built"] >= 1 and results[1]["built"] >= 1  # both worked
    assert len(shard_entries(cfg)) == 6


def test_deal_balances_bytes_largest_first():
    owner = deal([10, 1, 1, 9, 1, 1], 2)
    loads = [sum(s for s, o in zip([10, 1, 1, 9, 1, 1], owner) if o == r) for r in (0, 1)]
    assert sorted(loads) == [11, 12] and deal([10, 1, 1, 9, 1, 1], 2) == owner


def test_a_bad_shard_keeps_the_finished_ones(tmp_path, jsonl_cfg):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, 3)
    bad = corpus / "part-003.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + "{broken\n")
    cfg = jsonl_cfg(corpus, f"data.tokenizer={_tokenizer_file(tmp_path, corpus, jsonl_cfg)}")
    with pytest.raises(BadRecord, match=r"part-003\.jsonl:2: not JSON"):
        build_data(cfg, progress=False)
    assert len(shard_entries(cfg)) == 3  # the three good shards stay cached
    assert not [p for p in os.listdir(tmp_path / "cache" / "shards") if ".tmp-" in p]
    bad.write_text(json.dumps({"text": "fixed"}) + "\n")
    assert built(build_data(cfg, progress=False)) == 1


def _tokenizer_file(tmp_path, corpus, jsonl_cfg):
    """A tokenizer trained on good data, so a broken record is met while tokenising, not while sampling."""
    good = tmp_path / "good"
    write_corpus(good, 2)
    data = build_data(jsonl_cfg(good, f"data.cache_dir={tmp_path / 'tokcache'}"), progress=False)
    return data.tokenizer.save(tmp_path / "tokenizer")


def test_cleanup_removes_only_dead_builds(tmp_path):
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = tmp_path / f"k.tmp-{host}-{os.getpid()}-aaaa"
    gone = tmp_path / f"k.tmp-{host}-{dead}-bbbb"
    remote_fresh = tmp_path / "k.tmp-othernode-1-cccc"
    remote_old = tmp_path / "k.tmp-othernode-2-dddd"
    for d in (live, gone, remote_fresh, remote_old):
        d.mkdir()
        (d / "tokens.bin").write_bytes(b"x")
    old = time.time() - shard_cache.STALE_SECONDS - 60
    os.utime(remote_old / "tokens.bin", (old, old))
    os.utime(remote_old, (old, old))
    removed = shard_cache.clean_stale(tmp_path, "k")
    assert sorted(removed) == sorted([gone, remote_old])
    assert live.is_dir() and remote_fresh.is_dir()


def test_dry_run_plans_without_tokenising(tmp_path, jsonl_cfg):
    write_corpus(tmp_path / "corpus", 3)
    cfg = jsonl_cfg(tmp_path / "corpus")
    plan = build_data(cfg, progress=False, tokenize=False)
    assert plan.train is None and plan.plan["missing"] == 3 and plan.plan["cached"] == 0
    assert not (tmp_path / "cache" / "shards").exists() or shard_entries(cfg) == []
    assert "3 to tokenise" in plan.summary()


def test_prepare_command_builds_shares(tmp_path, jsonl_cfg):
    from lctrain.cli import main
    write_corpus(tmp_path / "corpus", 4)
    cfg = jsonl_cfg(tmp_path / "corpus")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(cfg.to_yaml())
    assert main(["prepare", str(recipe), "--shard", "0/2", "--no-progress"]) == 0
    first = len(shard_entries(cfg))
    assert 1 <= first < 4
    assert main(["prepare", str(recipe), "--shard", "1/2", "data.num_workers=1", "--no-progress"]) == 0
    assert len(shard_entries(cfg)) == 4
    assert built(build_data(cfg, progress=False)) == 0
    assert main(["prepare", str(recipe), "--shard", "2/2"]) == 2


def test_a_big_jsonl_file_is_cut_into_pieces_at_line_ends(tmp_path, monkeypatch):
    from lctrain.config import SourceConfig
    from lctrain.data import shards as shards_mod
    from lctrain.data.sources import Source

    rows = [json.dumps({"text": f"row {i} " + "x" * (i % 50)}) for i in range(300)]
    rows[257] = "{broken"
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(shards_mod, "SHARD_BYTES", 2000)
    monkeypatch.setattr(shards_mod, "_ALIGN_SCAN", 16)  # also exercises lines longer than the scan window
    src = Source(SourceConfig(type="jsonl", path=str(path)), 0, 0, tmp_path / "cache")
    pieces = src.shards()
    assert len(pieces) > 5
    assert pieces[0].start == 0 and pieces[-1].end == path.stat().st_size
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
    data = path.read_bytes()
    assert all(data[p.end - 1:p.end] == b"\n" for p in pieces)
    texts = list(src.iter_texts(on_bad="skip"))
    assert texts == [json.loads(r)["text"] for i, r in enumerate(rows) if i != 257]
    with pytest.raises(BadRecord, match=r"big\.jsonl:258: not JSON"):
        list(src.iter_texts())
