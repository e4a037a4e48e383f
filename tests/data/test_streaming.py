"""data.streaming: lazy reading and tokenising, PackedStream-identical windows, per-rank shards, exact resume."""
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from lctrain.config import ConfigError
from lctrain.data import build_data
from lctrain.data.packing import PackedStream
from lctrain.data.streaming import _VirtualRank
from lctrain.data.token_store import TokenSplit
from tests.data.textgen import random_text


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(3)
    for k in range(5):
        rows = [json.dumps({"text": f"doc {k}-{i} " + random_text(rng, rng.randint(5, 60))}) for i in range(15)]
        (tmp_path / "corpus").mkdir(exist_ok=True)
        (tmp_path / "corpus" / f"p{k}.jsonl").write_text("\n".join(rows) + "\n")
    return tmp_path / "corpus"


def stream_cfg(make_cfg, corpus, *overrides):
    return make_cfg([{"type": "jsonl", "path": str(corpus)}], "data.streaming=true", "data.num_workers=1",
                    *overrides)


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_windows_are_those_of_packed_stream():
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 200, size=int(n)) for n in rng.integers(1, 40, size=30)]
    loader = _VirtualRank.__new__(_VirtualRank)
    loader.seq_len, loader.bos_id, loader.eos_id = 16, 2, 3
    loader.weights, loader.credits = [1.0], [0.0]
    loader._tokens = np.zeros(0, dtype=np.int64)
    loader._segments = np.zeros(0, dtype=np.int64)
    loader._next_segment = 0
    loader.windows, loader._started = 0, True
    feed = iter(docs)

    class Fake:
        def next_document(self):
            return next(feed)
    loader.streams = [Fake()]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    packed = PackedStream([TokenSplit(np.concatenate(docs), offsets)], np.zeros(len(docs), dtype=np.int64),
                          np.arange(len(docs)), 16, 2, 3)
    for i in range(len(packed) - 3):
        mine, ref = loader._window(), packed.example(i)
        for key in ref:
            assert np.array_equal(mine[key], ref[key]), (i, key)


def test_ranks_read_disjoint_shards_covering_every_document(corpus, make_cfg):
    cfg = stream_cfg(make_cfg, corpus)
    data = build_data(cfg, progress=False)
    tok = data.tokenizer
    expected = Counter(tuple(tok.encode(json.loads(line)["text"])) for path in sorted(corpus.iterdir())
                       for line in path.read_text().splitlines())
    got = Counter()
    for rank in (0, 1):
        loader = build_data(cfg, rank, 2, progress=False).train
        stream = loader.virtual(rank).streams[0]
        stream.start()
        end_of_epoch = (0, len(stream.my_shards(0)[0]), 0)
        while stream.cursor != end_of_epoch:
            got[tuple(stream.next_document().tolist())] += 1
        loader.close()
    assert got == expected  # each document of epoch 0 exactly once, on one of the two ranks


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_is_exact(corpus, make_cfg, workers):
    cfg = stream_cfg(make_cfg, corpus, f"data.num_workers={workers}")
    first = build_data(cfg, progress=False).train
    for _ in range(7):  # more than an epoch of this corpus: crosses into epoch 1
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(5)]
    first.close()
    again = build_data(cfg, progress=False).train
    again.load_state_dict(json.loads(json.dumps(state)))  # the state survives serialisation
    assert same([next(again) for _ in range(5)], expected)
    again.close()


def test_streaming_starts_without_a_cache_and_evaluates_on_eval_sources(corpus, make_cfg, tmp_path):
    (tmp_path / "valid.jsonl").write_text(json.dumps({"text": "river stone " * 40}) + "\n")
    cfg = stream_cfg(make_cfg, corpus)
    cfg.data.eval_sources = [type(cfg.data.sources[0])(type="jsonl", path=str(tmp_path / "valid.jsonl"))]
    data = build_data(cfg, progress=False)
    batch = next(data.train)
    assert batch["input_ids"].shape == (2, 32)
    shards = tmp_path / "cache" / "shards"
    assert len([p for p in shards.iterdir() if not p.name.endswith(".lock")]) == 1  # the eval source only
    assert data.eval_batches(1) and "streaming 5 shards" in data.summary()
    data.train.close()


def test_streaming_refuses_generated_sources(make_cfg):
    cfg = make_cfg([{"type": "mqar", "num_kv_pairs": 2, "task_vocab": 16}], "data.streaming=true")
    with pytest.raises(ConfigError, match=r"^data\.streaming: data\.sources\[0\] is a generated source"):
        build_data(cfg, progress=False)


@pytest.mark.slow
def test_streaming_training_resumes_bit_identically(cache_dir, tmp_path, corpus):
    from tests.train.conftest import run_lctrain, train_losses

    steps = ["train.steps=6", f"data.sources=[{{type: jsonl, path: {corpus}}}]", "data.streaming=true",
             "data.num_workers=2", "data.max_documents=0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_lctrain(cache_dir, straight, *steps)
    run_lctrain(cache_dir, split, *steps, "train.stop_at=3")
    proc = run_lctrain(cache_dir, split, *steps)
    assert "resumed from" in proc.stdout and "data: streaming 5 shards" in proc.stdout
    assert train_losses(straight) == train_losses(split)


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1)])
def test_resume_on_another_world_size_continues_the_global_order(corpus, make_cfg, before, after):
    """The windows are numbered globally (window w: window w // V of virtual rank w % V, V fixed by the first
    run's world size), so a state saved by `before` ranks continues on `after` with the windows the `before`
    ranks would have read next, in the same global order."""
    def group(world, state=None):
        cfg = stream_cfg(make_cfg, corpus, f"train.micro_batch_size={2 // world}", "data.seq_len=128")
        loaders = [build_data(cfg, r, world, progress=False).train for r in range(world)]
        if state is not None:
            for loader in loaders:
                loader.load_state_dict(json.loads(json.dumps(state)))
        return loaders

    def rows(loaders, steps):  # the group's windows of each step, in global order
        out = []
        for _ in range(steps):
            batches = [next(loader)["input_ids"] for loader in loaders]
            out += [batches[i % len(loaders)][i // len(loaders)].tolist() for i in range(2)]
        return out

    old = group(before)
    rows(old, 1)
    for _ in range(200):  # until every virtual rank reads epoch 1
        if all(lane.streams[0].cursor[0] >= 1 for loader in old for lane in loader._virtual.values()):
            break
        rows(old, 1)
    else:
        raise AssertionError("no virtual rank reached epoch 1")
    states = [loader.state_dict() for loader in old]
    assert len({s["position"] for s in states}) == 1
    expected = rows(old, 4)  # what the old group reads next
    new = group(after, dict(states[0], all_ranks=states))
    assert rows(new, 4) == expected
    for loader in old + new:
        loader.close()
