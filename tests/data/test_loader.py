"""build_data end to end: caches, order, data-parallel sharding, exact resume, evaluation batches."""
import json
import random
from collections import Counter

import pytest
import torch

from lctrain.config import ConfigError
from lctrain.data import build_data
from lctrain.data import tokenizer as tok_mod
from lctrain.data.shards import Shard
from lctrain.data.tokenizer import Tokenizer
from lctrain.models.context import cu_seqlens_from_positions
from tests.data.textgen import random_text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text directory and a jsonl file (two weighted sources) plus a cache shared by the module's tests."""
    root = tmp_path_factory.mktemp("loader")
    rng = random.Random(0)
    (root / "texts").mkdir()
    for i in range(24):
        (root / "texts" / f"{i:02d}.txt").write_text(random_text(rng, rng.randint(10, 80)))
    rows = [{"body": random_text(rng, rng.randint(5, 40))} for _ in range(30)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def cfg_for(corpus, make_cfg):
    def make(*overrides):
        sources = [{"type": "text", "path": str(corpus / "texts"), "weight": 2.0},
                   {"type": "jsonl", "path": str(corpus / "rows.jsonl"), "field": "body"}]
        return make_cfg(sources, *overrides, cache=corpus / "cache")
    return make


def windows(batch):
    """Rows of a batch as hashable keys."""
    return [tuple(row.tolist()) for row in batch["input_ids"]]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_first_build_tokenises_and_later_builds_only_read_the_cache(cfg_for, corpus, monkeypatch, capfd):
    cfg = cfg_for()
    first = build_data(cfg, 0, 1, progress=True)
    assert "tokenising" in capfd.readouterr().err
    assert first.tokens_per_window == cfg.data.seq_len == 32
    entries = sorted(p.name for p in (corpus / "cache" / "shards").iterdir())
    shards = [e for e in entries if not e.endswith(".lock")]
    assert len(shards) == first.plan["shards"] >= 2 and not any(".tmp-" in e for e in entries)
    expected = take(first.train, 3)

    def forbidden(*args, **kwargs):
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(Tokenizer, "encode_batch", forbidden)
    monkeypatch.setattr(tok_mod, "train_tokenizer", forbidden)
    monkeypatch.setattr(Shard, "read", forbidden)  # not even the source files are read again
    second = build_data(cfg, 0, 1, progress=False)
    assert capfd.readouterr().err == ""
    assert same_batches(take(second.train, 3), expected)


def test_batches_have_the_documented_format(cfg_for):
    data = build_data(cfg_for(), 0, 1, progress=False)
    n_masked = 0
    for batch in take(data.train, 30):
        for key in ("input_ids", "labels", "position_ids"):
            assert batch[key].shape == (2, 32) and batch[key].dtype == torch.int64
        assert torch.equal(batch["cu_seqlens"], cu_seqlens_from_positions(batch["position_ids"]))
        ids, labels = batch["input_ids"], batch["labels"]
        kept = labels != -100
        assert torch.equal(labels[:, :-1][kept[:, :-1]], ids[:, 1:][kept[:, :-1]])  # labels are inputs shifted
        assert (ids[~kept] == data.tokenizer.eos_id).all()  # only EOS -> next document's BOS is ignored
        n_masked += int((~kept).sum())
        assert (batch["position_ids"][:, 0] == 0).all()
    assert n_masked > 0
    assert data.tokenizer.decode([t for t in ids[0].tolist() if t > 3]).strip()


def test_order_is_a_function_of_the_seed(cfg_for):
    a = take(build_data(cfg_for(), 0, 1, progress=False).train, 4)
    b = take(build_data(cfg_for(), 0, 1, progress=False).train, 4)
    c = take(build_data(cfg_for("train.seed=1"), 0, 1, progress=False).train, 4)
    assert same_batches(a, b) and not same_batches(a, c)


def test_dp_ranks_get_disjoint_windows_covering_the_epoch(cfg_for):
    ranks = [build_data(cfg_for(), r, 2, progress=False) for r in range(2)]
    steps = ranks[0].train.order.windows_per_epoch // 4  # 2 ranks x micro_batch_size 2 windows per step
    assert steps >= 5
    ids = [[], []]
    seen = [[], []]
    for _ in range(steps):
        for r, data in enumerate(ranks):
            ids[r] += data.train.step_windows().tolist()
            seen[r] += windows(next(data.train))
    assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == list(range(steps * 4))
    every = [tuple(ranks[0].train.example(i)["input_ids"].tolist()) for i in range(steps * 4)]
    assert Counter(seen[0] + seen[1]) == Counter(every)
    assert seen[0][:2] == [every[0], every[2]] and seen[1][:2] == [every[1], every[3]]


def test_resume_is_exact_across_an_epoch_boundary_and_two_resumes(cfg_for):
    cfg = cfg_for()
    reference = build_data(cfg, 0, 1, progress=False).train
    per_epoch = reference.order.windows_per_epoch // 2
    total = per_epoch + 6
    expected = take(reference, total)
    assert reference.state_dict()["epoch"] == 1

    first = build_data(cfg, 0, 1, progress=False).train
    got = take(first, per_epoch - 2)
    state = json.loads(json.dumps(first.state_dict()))  # plain data
    second = build_data(cfg, 0, 1, progress=False).train
    second.load_state_dict(state)
    got += take(second, 5)  # crosses into epoch 1
    assert second.state_dict()["epoch"] == 1
    third = build_data(cfg, 0, 1, progress=False).train
    third.load_state_dict(second.state_dict())
    got += take(third, total - len(got))
    assert same_batches(got, expected)


def test_resume_with_another_dp_size_continues_with_the_remaining_windows(cfg_for):
    cfg = cfg_for("train.micro_batch_size=1")
    sequence = [windows(b)[0] for b in take(build_data(cfg, 0, 1, progress=False).train, 20)]
    old = [build_data(cfg_for("train.micro_batch_size=2"), r, 2, progress=False).train for r in range(2)]
    consumed = [w for _ in range(3) for loader in old for w in windows(next(loader))]
    assert sorted(consumed) == sorted(sequence[:12])
    assert old[0].state_dict() == old[1].state_dict()
    new = build_data(cfg, 0, 1, progress=False).train
    new.load_state_dict(old[0].state_dict())
    assert [windows(next(new))[0] for _ in range(8)] == sequence[12:]


def test_resume_refuses_other_data_or_seed(cfg_for):
    state = build_data(cfg_for(), 0, 1, progress=False).train.state_dict()
    other_len = build_data(cfg_for("data.seq_len=16"), 0, 1, progress=False).train
    with pytest.raises(ConfigError, match=r"^data\.sources: the checkpoint was trained on different data"):
        other_len.load_state_dict(state)
    other_seed = build_data(cfg_for("train.seed=5"), 0, 1, progress=False).train
    with pytest.raises(ConfigError, match=r"^train\.seed: 5 differs from the checkpoint's 0"):
        other_seed.load_state_dict(state)
    with pytest.raises(ConfigError, match=r"^checkpoint\.resume: .*lacks epoch"):
        other_seed.load_state_dict({"position": 0})


def test_eval_batches_are_fixed_and_the_same_on_every_rank(cfg_for):
    single = build_data(cfg_for(), 0, 1, progress=False)
    batches = single.eval_batches(3)
    assert len(batches) == 3
    assert same_batches(batches, single.eval_batches(3))
    assert same_batches(single.eval_batches(1), batches[:1])
    for batch in batches:
        assert batch["input_ids"].shape == (2, 32)
        assert torch.equal(batch["cu_seqlens"], cu_seqlens_from_positions(batch["position_ids"]))
    everything = single.eval_batches(10_000)
    assert sum(len(b["input_ids"]) for b in everything) == len(single._eval)  # all windows, last batch partial
    for store in single.tokens:  # held-out documents are not training documents
        train_docs = {tuple(store.train.document(i).tolist()) for i in range(len(store.train))}
        eval_docs = {tuple(store.eval.document(i).tolist()) for i in range(len(store.eval))}
        assert eval_docs and not train_docs & eval_docs
    other_rank = build_data(cfg_for(), 1, 2, progress=False)
    assert same_batches(other_rank.eval_batches(3), batches)
    assert build_data(cfg_for("data.eval_fraction=0.0"), 0, 1, progress=False).eval_batches(4) == []


def test_seq_len_longer_than_the_data_is_a_config_error(cfg_for):
    with pytest.raises(ConfigError, match=r"^data\.seq_len: 100000 needs at least 100001 training tokens"):
        build_data(cfg_for("data.seq_len=100000"), 0, 1, progress=False)


def test_stdlib_default_source_builds(make_cfg):
    data = build_data(make_cfg([{"type": "stdlib"}], "data.max_documents=4", "data.vocab_size=400",
                               "data.tokenizer_sample_chars=30000"), 0, 1, progress=False)
    meta = data.tokens[0].meta
    assert meta["source"] == "data.sources[0]" and meta["train_docs"] + meta["eval_docs"] == 4
    text = data.tokenizer.decode(next(data.train)["input_ids"][0].tolist())
    assert text.strip()


def test_next_epoch_is_prepared_ahead_and_gives_the_same_batches(cfg_for):
    """Every lane's next epoch is built in the background before the lane reaches it: crossing the boundary
    builds nothing synchronously, and the batches equal those of a loader that builds everything on demand."""
    ahead = build_data(cfg_for(), 0, 1, progress=False).train
    steps = 3 * ahead.order.windows_per_epoch // ahead.micro_batch_size
    ahead_batches = take(ahead, steps)
    lanes = ahead.order.held_lanes()
    assert len(lanes) == ahead.order.lanes > 1 and all(len(lane.totals) >= 2 for lane in lanes)
    first_epoch_docs = sum(len(lane._build(0).slot) for lane in lanes)
    assert sum(lane.built for lane in lanes) == first_epoch_docs  # later epochs all came from the background

    plain = build_data(cfg_for(), 0, 1, progress=False).train
    plain.order.prefetch = False
    assert same_batches(take(plain, steps), ahead_batches)
    assert sum(lane.built for lane in plain.order.held_lanes()) > first_epoch_docs
