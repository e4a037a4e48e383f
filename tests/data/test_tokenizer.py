"""Tokenizer: deterministic training, the cache, loading from a path, byte fallback."""
import pytest

from lctrain.config import ConfigError, SourceConfig
from lctrain.data import tokenizer as tok_mod
from lctrain.data.sources import build_sources
from lctrain.data.tokenizer import Tokenizer, get_tokenizer, sample_lines, train_tokenizer


@pytest.fixture
def corpus_sources(tmp_path, write_text_files):
    write_text_files(tmp_path / "corpus", 12)
    return build_sources([SourceConfig(type="text", path=str(tmp_path / "corpus"))], 0, tmp_path / "hf")


def test_training_is_deterministic_and_has_the_special_ids(corpus_sources):
    lines = list(sample_lines(corpus_sources, 5000))
    assert lines == list(sample_lines(corpus_sources, 5000))
    assert 0 < sum(len(line) for line in lines) <= 5000
    first, second = train_tokenizer(lines, 300), train_tokenizer(lines, 300)
    assert first == second
    tok = Tokenizer(first)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert 260 < tok.vocab_size <= 300


def test_byte_fallback_round_trips_unseen_characters(corpus_sources):
    tok = Tokenizer(train_tokenizer(sample_lines(corpus_sources, 5000), 300))
    text = "alpha\tbeta\n    gamma ünïcödé 日本語 🙂 ∑x²\n\n"
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "mu"]) == [ids, tok.encode("mu")]


def test_trained_tokenizer_is_cached_and_reused(tmp_path, corpus_sources, make_cfg, monkeypatch):
    cfg = make_cfg([{"type": "text", "path": str(tmp_path / "corpus")}])
    first = get_tokenizer(cfg.data, corpus_sources, tmp_path / "cache")
    entries = [p for p in (tmp_path / "cache" / "tokenizers").iterdir() if p.is_dir() and p.name != "by-sources"]
    assert len(entries) == 1 and (entries[0] / "tokenizer.model").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")
    monkeypatch.setattr(tok_mod, "train_tokenizer", no_training)
    again = get_tokenizer(cfg.data, corpus_sources, tmp_path / "cache")
    assert again.model_proto == first.model_proto
    # Different settings are a different cache entry (and would need training).
    cfg.data.vocab_size = 320
    with pytest.raises(AssertionError, match="reused"):
        get_tokenizer(cfg.data, corpus_sources, tmp_path / "cache")


def test_save_and_load_from_a_path(tmp_path, corpus_sources, make_cfg, monkeypatch):
    trained = Tokenizer(train_tokenizer(sample_lines(corpus_sources, 5000), 300))
    saved = trained.save(tmp_path / "run" / "tokenizer")
    assert saved.name == "tokenizer.model"
    for where in (saved, saved.parent):
        loaded = Tokenizer.load(where)
        assert loaded.model_proto == trained.model_proto
        assert loaded.encode("omega token") == trained.encode("omega token")
    # data.tokenizer set: that model is used, nothing is trained.
    monkeypatch.setattr(tok_mod, "train_tokenizer", lambda *a, **k: pytest.fail("trained despite data.tokenizer"))
    cfg = make_cfg([{"type": "text", "path": str(tmp_path / "corpus")}], f"data.tokenizer={saved}")
    assert get_tokenizer(cfg.data, corpus_sources, tmp_path / "cache").fingerprint == trained.fingerprint


def test_load_errors_name_data_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: file not found"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: .* is not a sentencepiece model"):
        Tokenizer.load(tmp_path / "junk.model")


def test_vocab_too_small_for_byte_fallback(corpus_sources):
    with pytest.raises(ConfigError, match=r"^data\.vocab_size: 200 is too small .* >= 268"):
        train_tokenizer(sample_lines(corpus_sources, 2000), 200)
