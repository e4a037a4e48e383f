"""Each evaluation on rigged models (exact expected scores) and tiny real models (determinism)."""
import math

import numpy as np
import pytest
import torch

from lctrain.config import ConfigError
from lctrain.data.synthetic import mqar_documents, rng_for
from lctrain.eval.generate import generate
from lctrain.eval.mqar import MQARSetting, evaluate_mqar
from lctrain.eval.niah import evaluate_niah, plot_heatmap
from lctrain.eval.passkey import evaluate_passkey
from lctrain.eval.perplexity import frame_documents, perplexity, window_starts
from tests.eval.conftest import tiny_model
from tests.eval.rigged import InductionModel, UniformModel

VOCAB = 300


def test_generate_through_cache_equals_greedy_full_forward():
    model = tiny_model(VOCAB, "GA")
    prompt = torch.randint(4, VOCAB, (2, 9))
    new = generate(model, prompt, 6)
    ids = prompt
    for _ in range(6):  # reference: recompute the whole sequence for every token
        nxt = model(ids, return_logits=True).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(new, ids[:, 9:])


def test_mqar_scores_a_perfect_recaller_and_partial_knowledge_exactly():
    settings = [MQARSetting(64, 4), MQARSetting(96, 8)]
    perfect = evaluate_mqar(InductionModel(VOCAB), settings, task_vocab=64, trials=12, batch_size=5, seed=1,
                            progress=False)
    assert [r["accuracy"] for r in perfect] == [1.0, 1.0]
    assert [r["queries"] for r in perfect] == [12 * 4, 12 * 8]
    # Knows only the lower half of the key ids: accuracy = share of queries with such keys (counted from the
    # documents the evaluation generates, with the same seed stream).
    known = lambda token: token < 4 + 16  # noqa: E731
    partial = evaluate_mqar(InductionModel(VOCAB, known), settings[:1], task_vocab=64, trials=12, seed=1,
                            progress=False)[0]
    tokens, answer_at = mqar_documents(rng_for(1, 2, 64, 4, 64), 12, 63, 4, 64, 4, 0)
    expected = np.mean([known(int(t)) for t in tokens[answer_at]])
    assert 0 < partial["accuracy"] < 1 and partial["accuracy"] == pytest.approx(expected)
    assert evaluate_mqar(UniformModel(VOCAB), settings[:1], task_vocab=64, trials=4, progress=False)[0][
        "accuracy"] < 0.5


def test_mqar_is_deterministic_under_seed():
    model = tiny_model(VOCAB)
    run = lambda seed: evaluate_mqar(model, [MQARSetting(48, 4)], task_vocab=64, trials=16, seed=seed,  # noqa: E731
                                     progress=False)
    assert run(0) == run(0)
    with pytest.raises(ConfigError, match="--kv-pairs: 20 pairs need"):
        evaluate_mqar(model, [MQARSetting(48, 20)], task_vocab=64, progress=False)


def test_passkey_accuracy_on_rigged_and_real_models(tokenizer):
    perfect = evaluate_passkey(InductionModel(tokenizer.vocab_size), tokenizer, [120, 200], trials=3,
                               batch_size=2, progress=False)
    assert [r["accuracy"] for r in perfect] == [1.0, 1.0]
    assert perfect[0]["samples"][0]["generated"].strip().startswith(perfect[0]["samples"][0]["expected"])
    assert evaluate_passkey(UniformModel(tokenizer.vocab_size), tokenizer, [120], trials=3,
                            progress=False)[0]["accuracy"] == 0.0
    model = tiny_model(tokenizer.vocab_size)
    a = evaluate_passkey(model, tokenizer, [100], trials=2, seed=3, progress=False)
    b = evaluate_passkey(model, tokenizer, [100], trials=2, seed=3, progress=False)
    assert a == b


def test_niah_grid_and_heatmap(tokenizer, tmp_path):
    haystack = tokenizer.encode("The sky is blue. Here we go. " * 20)
    rows = evaluate_niah(InductionModel(tokenizer.vocab_size), tokenizer, haystack, [100, 160], [0.0, 0.5, 1.0],
                         trials=2, progress=False)
    assert [(r["length"], r["depth"]) for r in rows] == [(n, d) for n in (100, 160) for d in (0.0, 0.5, 1.0)]
    assert all(r["accuracy"] == 1.0 for r in rows)
    png = plot_heatmap(rows, tmp_path / "niah.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("length,stride", [(8, 8), (8, 3), (8, 1), (50, 25)])
def test_sliding_windows_score_every_token_once(length, stride):
    stream = torch.randint(0, 17, (37,))
    result = perplexity(UniformModel(17), stream, length, stride, progress=False)
    assert result["tokens"] == 36
    assert result["ppl"] == pytest.approx(17.0)  # uniform over 17 ids: exactly the vocabulary size
    # each later window scores its last `stride` targets (fewer for the end-aligned last one)
    starts = window_starts(37, length, stride)
    assert starts[0] == (0, 1) and starts[-1][0] + min(length, 37) == 37
    assert all(first >= 1 for _, first in starts)  # every scored token has context in its window


def test_perplexity_of_a_real_model_is_deterministic_and_finite(tokenizer):
    stream = frame_documents([tokenizer.encode("The grass is green. " * 8)] * 2, tokenizer.bos_id, tokenizer.eos_id)
    model = tiny_model(tokenizer.vocab_size)
    a = perplexity(model, stream, 32, 16, progress=False)
    assert a == perplexity(model, stream, 32, 16, progress=False)
    assert math.isfinite(a["ppl"]) and a["tokens"] == stream.numel() - 1
    with pytest.raises(ConfigError, match="--stride: 40"):
        perplexity(model, stream, 32, 40, progress=False)
