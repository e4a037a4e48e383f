"""Evaluation data: held out by content hash (stable when the corpus grows), or an explicit data.eval_sources."""
import json
import random

import numpy as np

from lctrain.data import build_data
from lctrain.data.corpus import held_out
from tests.data.textgen import random_text


def write_part(path, n, seed):
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"doc {seed}-{i} " + random_text(rng, 20)}) + "\n"
                            for i in range(n)))


def eval_texts(data):
    tok = data.tokenizer
    return {tok.decode(store.eval.document(i).tolist()) for store in data.tokens for i in range(len(store.eval))}


def test_held_out_documents_stay_held_out_when_a_shard_is_added(tmp_path, make_cfg):
    corpus = tmp_path / "corpus"
    for k in range(3):
        write_part(corpus / f"p{k}.jsonl", 40, k)
    first = build_data(make_cfg([{"type": "jsonl", "path": str(corpus)}], "data.num_workers=1",
                                "data.eval_fraction=0.1"), progress=False)
    model = first.tokenizer.save(tmp_path / "tok")
    cfg = make_cfg([{"type": "jsonl", "path": str(corpus)}], "data.num_workers=1", "data.eval_fraction=0.1",
                   f"data.tokenizer={model}")
    before = eval_texts(build_data(cfg, progress=False))
    assert 4 <= len(before) <= 25
    write_part(corpus / "p0a.jsonl", 40, 9)  # sorts between p0 and p1: every later document moves by 40
    after = eval_texts(build_data(cfg, progress=False))
    assert before <= after and len(after) > len(before)


def test_held_out_is_a_function_of_the_hash_and_the_fraction():
    hashes = np.arange(10000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    mask = held_out(hashes, 0.05)
    assert 0.04 < mask.mean() < 0.06
    assert np.array_equal(held_out(hashes[5000:], 0.05), mask[5000:])  # no dependence on position


def test_eval_sources_are_the_evaluation_set(tmp_path, make_cfg):
    write_part(tmp_path / "train.jsonl", 30, 1)
    write_part(tmp_path / "valid.jsonl", 6, 2)
    cfg = make_cfg([{"type": "jsonl", "path": str(tmp_path / "train.jsonl")}], "data.num_workers=1")
    cfg.data.eval_sources = [type(cfg.data.sources[0])(type="jsonl", path=str(tmp_path / "valid.jsonl"))]
    data = build_data(cfg, progress=False)
    assert len(data.tokens[0].train) == 30 and len(data.tokens[0].eval) == 0  # no train document held out
    assert len(data.tokens[1].eval) == 6
    assert {t.split(" ")[1] for t in eval_texts(data)} == {f"2-{i}" for i in range(6)}
    assert data.eval_batches(2) and "data.eval_sources" in data.summary()
