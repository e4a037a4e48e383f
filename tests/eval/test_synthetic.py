"""Synthetic sources: deterministic, correctly formed, and usable in `build_data` beside text."""
import numpy as np
import pytest

from lctrain.config import ConfigError, load_config
from lctrain.data.synthetic import (PasskeyPrompts, mqar_documents, random_digits, rng_for, task_id_base)
from lctrain.data.tokenizer import Tokenizer, train_tokenizer

BASE, VOCAB, PAD = 4, 64, 0


def _docs(seed=0, count=50, length=60, pairs=6):
    return mqar_documents(rng_for(seed, 0), count, length, pairs, VOCAB, BASE, PAD)


def test_mqar_is_deterministic_and_seed_dependent():
    a, mask_a = _docs(seed=1)
    b, mask_b = _docs(seed=1)
    c, _ = _docs(seed=2)
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b)
    assert not np.array_equal(a, c)


def test_mqar_documents_are_well_formed():
    pairs, half = 6, VOCAB // 2
    tokens, answer_at = _docs(pairs=pairs)
    for row, mask in zip(tokens, answer_at):
        keys, values = row[0:2 * pairs:2], row[1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs  # distinct keys
        assert ((keys >= BASE) & (keys < BASE + half)).all()  # keys: first half of the task ids
        assert ((values >= BASE + half) & (values < BASE + VOCAB)).all()  # values: second half
        positions = np.flatnonzero(mask)
        assert len(positions) == pairs and (positions >= 2 * pairs).all()  # every key queried once, after context
        answers = dict(zip(keys.tolist(), values.tolist()))
        assert sorted(row[positions].tolist()) == sorted(keys.tolist())
        for p in positions:  # the answer is the value paired with that key earlier in the document
            assert row[p + 1] == answers[row[p]]
        rest = np.ones(len(row), bool)
        rest[:2 * pairs] = False
        rest[positions] = rest[positions + 1] = False
        assert (row[rest] == PAD).all()


def test_mqar_gaps_favour_short_distances():
    tokens, answer_at = mqar_documents(rng_for(0, 0), 400, 400, 4, VOCAB, BASE, PAD)
    slots = (np.nonzero(answer_at)[1] - 8) // 2  # query slot after the context
    total = (400 - 8) // 2
    assert np.mean(slots < total // 4) > 0.4  # a uniform placement would give about 0.25


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(train_tokenizer(["The grass is green. What is the pass key? 0123456789"], 400))


def test_passkey_prompt_has_exact_length_and_hides_the_key(tokenizer):
    prompts = PasskeyPrompts(tokenizer)
    key = random_digits(rng_for(0, 0), 1)[0]
    for depth in (0.0, 0.5, 1.0):
        ids = prompts.prompt(key, 300, depth)
        assert len(ids) == 300
        text = tokenizer.decode(ids)
        assert f"The pass key is {key}." in text and text.endswith("The pass key is")
    early, late = (tokenizer.decode(prompts.prompt(key, 300, d)).index(key) for d in (0.1, 0.9))
    assert early < late
    doc = prompts.document(key, 200, 0.3)
    assert len(doc) == 200 and tokenizer.decode(doc).endswith(f"The pass key is {key}.")


def test_random_digits_have_five_digits():
    keys = random_digits(rng_for(3, 0), 200)
    assert all(len(k) == 5 and k.isdigit() and k[0] != "0" for k in keys)
    assert len(set(keys)) > 150


def test_config_validates_synthetic_sources():
    base = ["data.seq_len=64"]
    cfg = load_config(None, base + ["data.sources=[{type: mqar, num_kv_pairs: 4}]"])
    assert cfg.data.sources[0].type == "mqar" and cfg.data.sources[0].path == ""
    with pytest.raises(ConfigError, match=r"data.sources\[0\].length: 62 tokens cannot hold 16 pairs"):
        load_config(None, base + ["data.sources=[{type: mqar, num_kv_pairs: 16}]"])
    with pytest.raises(ConfigError, match=r"task_vocab: 7 is not allowed"):
        load_config(None, base + ["data.sources=[{type: mqar, task_vocab: 7}]"])
    with pytest.raises(ConfigError, match=r"num_kv_pairs: 40 distinct keys"):
        load_config(None, ["data.seq_len=512", "data.sources=[{type: mqar, num_kv_pairs: 40, task_vocab: 64}]"])


def test_build_data_mixes_mqar_passkey_and_text(tmp_path):
    from lctrain.data import build_data

    text = tmp_path / "a.txt"
    text.write_text("Plain text for the mixture. " * 200)
    sources = (f"data.sources=[{{type: mqar, num_kv_pairs: 4, task_vocab: 64, num_examples: 200}}, "
               f"{{type: passkey, num_examples: 100}}, {{type: text, path: '{text}'}}]")
    overrides = [sources, "data.seq_len=128", "data.vocab_size=300", f"data.cache_dir={tmp_path / 'cache'}",
                 "train.micro_batch_size=4", "data.eval_fraction=0.05"]
    first = build_data(load_config(None, overrides), progress=False)
    second = build_data(load_config(None, overrides), progress=False)
    mqar, passkey = first.tokens[0], first.tokens[1]
    assert len(mqar.train) == 200 and len(mqar.eval) == 10 and len(passkey.train) == 100
    assert (mqar.train.lengths() == 126).all()  # [BOS] doc [EOS] fills one 128-token window
    base = task_id_base(first.tokenizer)
    doc = np.asarray(mqar.train.document(0))
    assert doc[:8:2].min() >= base and doc[1:8:2].max() < base + 64
    assert "pass key" in first.tokenizer.decode(passkey.train.document(3).tolist())
    for _ in range(3):  # same data, same batches
        a, b = next(first.train), next(second.train)
        assert all(np.array_equal(a[k], b[k]) for k in ("input_ids", "labels"))
    seeded = build_data(load_config(None, [s.replace("task_vocab: 64,", "task_vocab: 64, seed: 5,")
                                           for s in overrides]), progress=False)
    assert not np.array_equal(np.asarray(seeded.tokens[0].train.tokens), np.asarray(mqar.train.tokens))


def test_mqar_ids_beyond_the_tokenizer_are_refused(tmp_path):
    from lctrain.data import build_data

    cfg = load_config(None, ["data.sources=[{type: mqar, task_vocab: 4000}]", "data.seq_len=64",
                             f"data.cache_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].task_vocab: ids 4..4003 do not fit"):
        build_data(cfg, progress=False)


def test_mqar_batches_train_only_on_the_answers(tmp_path):
    """Labels of MQAR windows are -100 everywhere except at the values after the query keys; text sources in the
    same mixture keep a label on every target of their documents."""
    from lctrain.data import build_data

    pairs, vocab = 4, 64
    text = tmp_path / "a.txt"
    text.write_text("Plain text for the mixture, all of it trained. " * 200)
    sources = (f"data.sources=[{{type: mqar, num_kv_pairs: {pairs}, task_vocab: {vocab}, num_examples: 64}}, "
               f"{{type: text, path: '{text}'}}]")
    data = build_data(load_config(None, [sources, "data.seq_len=64", "data.vocab_size=300", "data.eval_fraction=0",
                                         f"data.cache_dir={tmp_path / 'cache'}", "train.micro_batch_size=8"]),
                      progress=False)
    base, pad = task_id_base(data.tokenizer), data.tokenizer.pad_id
    mqar_rows = text_targets = 0
    for _ in range(6):
        batch = next(data.train)
        for ids, labels, positions in zip(batch["input_ids"].numpy(), batch["labels"].numpy(),
                                          batch["position_ids"].numpy()):
            starts = np.flatnonzero(positions == 0)
            for lo, hi in zip(starts, [*starts[1:], len(ids)]):  # each document (or piece of one) in the window
                doc, doc_labels = ids[lo:hi], labels[lo:hi]
                if (doc == pad).any():  # MQAR: its filler is the pad id, which text never produces
                    assert hi - lo == 64 and doc[0] == data.tokenizer.bos_id  # [BOS] document [EOS] fills a window
                    mqar_rows += 1
                    keys, values = doc[1:2 * pairs + 1:2], doc[2:2 * pairs + 2:2]
                    assert ((keys >= base) & (keys < base + vocab // 2)).all()
                    answers = dict(zip(keys.tolist(), values.tolist()))
                    trained = np.flatnonzero(doc_labels != -100)
                    assert len(trained) == pairs  # nothing but the answers
                    assert all(t > 2 * pairs and doc_labels[t] == answers[doc[t]] for t in trained)
                    assert sorted(doc[trained].tolist()) == sorted(answers)  # every key answered once
                else:  # text: every target inside the document is trained, exactly as without masks
                    inner = doc_labels[:-1]  # the last label belongs to the next document or window
                    assert np.array_equal(inner, ids[lo + 1:hi])
                    text_targets += len(inner)
    assert mqar_rows >= 8 and text_targets > 100


def test_passkey_answer_only_trains_on_the_answer(tmp_path):
    from lctrain.data import build_data

    overrides = ["data.sources=[{type: passkey, num_examples: 20, answer_only: true}]", "data.seq_len=128",
                 "data.vocab_size=300", f"data.cache_dir={tmp_path / 'cache'}", "train.micro_batch_size=2"]
    data = build_data(load_config(None, overrides), progress=False)
    split = data.tokens[0].train
    tok = data.tokenizer
    batch = next(data.train)
    for row in range(2):
        targets = batch["labels"][row][batch["labels"][row] != -100]
        text = tok.decode(targets.tolist())
        assert text.strip().rstrip(".").isdigit() and len(text.strip()) == 6  # " 12345." and nothing else
    full = build_data(load_config(None, [o.replace(", answer_only: true", "") for o in overrides]), progress=False)
    assert (next(full.train)["labels"] != -100).sum() > 200  # without the option every token trains
    first = split.tokens[split.offsets[0]:split.offsets[1]][split.target_mask[split.offsets[0]:split.offsets[1]]]
    assert tok.decode(first.tolist()).strip().rstrip(".").isdigit()  # document 0's targets: its answer only
