"""Shared helpers for the data-pipeline tests: tiny corpora written to tmp dirs and configs pointing at them."""
import json
import random

import pytest

from lctrain.config import load_config
from tests.data.textgen import random_text


@pytest.fixture
def write_text_files():
    """write_text_files(directory, n, words=(lo, hi), seed=0) -> list of paths, one document per file."""
    def write(directory, n, words=(20, 120), seed=0, suffix=".txt"):
        rng = random.Random(seed)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(n):
            path = directory / f"doc{i:03d}{suffix}"
            path.write_text(random_text(rng, rng.randint(*words)))
            paths.append(path)
        return paths
    return write


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, rows) with rows a list of dicts."""
    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path
    return write


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg(sources, *overrides, cache=None) -> a validated Config with a tiny tokenizer and a tmp cache."""
    def make(sources, *overrides, cache=None):
        base = {"data": {"sources": sources, "vocab_size": 300, "tokenizer_sample_chars": 20_000, "seq_len": 32,
                         "eval_fraction": 0.1, "cache_dir": str(cache or tmp_path / "cache")},
                "train": {"micro_batch_size": 2, "seed": 0}}
        return load_config(None, list(overrides), base=base)
    return make
