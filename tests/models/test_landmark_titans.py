"""`landmark` and `titans` mixers: landmark insertion, retrieval decoding, Titans variants, recipes that train."""
from __future__ import annotations

import pytest
import torch

from lctrain.config import ConfigError, load_config
from lctrain.data.landmarks import insert_landmarks, landmark_layout
from lctrain.kernels import landmark_attention
from lctrain.models import BatchContext, LanguageModel
from lctrain.models.mixers.landmark import retrieval_attention

VOCAB = 61


def tiny_model(pattern: str, mixers: str) -> LanguageModel:
    overrides = [f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_heads=4", "model.n_layers=2",
                 f"model.pattern={pattern}", "model.ffn_dim=64", f"model.mixers={mixers}"]
    torch.manual_seed(0)
    return LanguageModel(load_config(None, overrides).model).double()


# ------------------------------------------------------------------------------------------------ landmark data
def test_insert_landmarks_places_one_after_every_block_of_each_document_and_pads_rows():
    ids = torch.arange(100, 110).repeat(2, 1)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], list(range(10))])
    out = insert_landmarks({"input_ids": ids, "labels": ids + 1000, "position_ids": positions}, 7, block_size=3)
    # row 0: two documents of 5 tokens -> landmarks after tokens 2 and 4 of each; row 1: after 2, 4, 6, 8, 10
    assert out["input_ids"][0].tolist() == [100, 101, 7, 102, 103, 7, 104, 105, 106, 7, 107, 108, 7, 109, 7]
    assert out["input_ids"][1].tolist() == [100, 101, 7, 102, 103, 7, 104, 105, 7, 106, 107, 7, 108, 109, 7]
    assert out["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0]
    assert out["position_ids"][1].tolist() == list(range(15))
    landmarks = out["input_ids"] == 7
    assert (out["labels"][landmarks] == -100).all()
    # every real token keeps its own target: none is lost and none becomes a landmark
    for row in range(2):
        assert out["labels"][row][~landmarks[row]].tolist() == (ids[row] + 1000).tolist()
    # landmarks sit at the last position of every block of block_size tokens (row 0 ends with one padding token)
    inserted = landmarks.clone()
    inserted[0, -1] = False
    assert ((out["position_ids"][inserted] % 3) == 2).all()


def test_insert_landmarks_pads_a_shorter_row_with_its_own_document():
    ids = torch.arange(1, 7).repeat(2, 1)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 0, 1]])
    out = insert_landmarks({"input_ids": ids, "labels": ids, "position_ids": positions}, 99, block_size=4)
    assert out["input_ids"].shape == (2, 8)
    assert out["input_ids"][1].tolist() == [1, 2, 3, 4, 5, 6, 99, 99]  # padding: landmark ids, no loss
    assert out["position_ids"][1].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert out["labels"][1, 6:].tolist() == [-100, -100]
    with pytest.raises(ValueError, match="reserved for landmarks"):
        insert_landmarks({"input_ids": ids, "labels": ids, "position_ids": positions}, 3, block_size=4)


def test_landmark_layout_needs_an_extra_vocabulary_id():
    base = ["model.pattern=MA", "model.n_layers=2", "data.vocab_size=512", "model.mixers={landmark: {block_size: 8}}"]
    assert landmark_layout(load_config(None, base + ["model.vocab_size=513"])) == (512, 8)
    assert landmark_layout(load_config(None, ["model.pattern=A", "model.vocab_size=512"])) is None
    with pytest.raises(ConfigError, match="data.vocab_size \\+ 1 = 513"):
        landmark_layout(load_config(None, base + ["model.vocab_size=512"]))


# ------------------------------------------------------------------------------------------------ landmark model
def test_retrieval_of_every_block_equals_training_attention():
    q, k, v = (torch.randn(2, 29, 3, 8, dtype=torch.float64) for _ in range(3))
    trained = landmark_attention(q, k, v, 6, backend="naive")
    for start in (0, 11, 17):
        read = retrieval_attention(q[:, start:], k, v, start, 6, top_k=0, scale=8 ** -0.5)
        torch.testing.assert_close(read, trained[:, start:], rtol=1e-12, atol=1e-12)
    # With k = the number of earlier blocks, top-k reads them all too; with fewer it is a different result.
    torch.testing.assert_close(retrieval_attention(q, k, v, 0, 6, top_k=4, scale=8 ** -0.5), trained)
    fewer = retrieval_attention(q, k, v, 0, 6, top_k=1, scale=8 ** -0.5)
    torch.testing.assert_close(fewer[:, :12], trained[:, :12])  # queries with at most one earlier block
    assert not torch.allclose(fewer[:, 18:], trained[:, 18:])


def _decode_logits(model, ids, prefix):
    batch, length = ids.shape
    cache = {}
    pieces = [model(ids[:, :prefix], ctx=BatchContext(torch.arange(prefix).expand(batch, prefix), cache=cache),
                    return_logits=True).logits]
    for t in range(prefix, length):
        ctx = BatchContext(torch.full((batch, 1), t), cache=cache)
        pieces.append(model(ids[:, t:t + 1], ctx=ctx, return_logits=True).logits)
    return torch.cat(pieces, dim=1)


def test_landmark_model_decoding_with_all_blocks_equals_training_forward():
    model = tiny_model("MA", "{landmark: {block_size: 4, retrieve_top_k: 0}}")
    ids = torch.randint(0, VOCAB, (2, 23))
    full = model(ids, return_logits=True).logits
    torch.testing.assert_close(_decode_logits(model, ids, 9), full, rtol=1e-10, atol=1e-10)


def test_landmark_model_keeps_documents_apart():
    model = tiny_model("M", "{landmark: {block_size: 4}}")
    ids = torch.randint(0, VOCAB, (1, 30))
    positions = torch.cat([torch.arange(13), torch.arange(17)]).unsqueeze(0)
    packed = model(ids, positions, return_logits=True).logits
    alone = model(ids[:, 13:], torch.arange(17).unsqueeze(0), return_logits=True).logits
    torch.testing.assert_close(packed[:, 13:], alone, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------ titans
TITANS = {
    "mac": "{titans: {variant: mac, segment_len: 5, chunk_size: 3, persistent_tokens: 2}}",
    "mag": "{titans: {variant: mag, window: 4, chunk_size: 4, persistent_tokens: 2}}",
    "mal": "{titans: {variant: mal, chunk_size: 4, persistent_tokens: 1}}",
    "mal-mlp": "{titans: {variant: mal, chunk_size: 4, memory_depth: 2, memory_hidden: 6}}",
    "mac-mlp": "{titans: {variant: mac, segment_len: 6, chunk_size: 2, memory_depth: 2}}",
}


@pytest.mark.parametrize("name", sorted(TITANS))
def test_titans_documents_are_independent_and_every_parameter_learns(name):
    model = tiny_model("TA", TITANS[name])
    ids = torch.randint(0, VOCAB, (1, 24))
    positions = torch.cat([torch.arange(9), torch.arange(15)]).unsqueeze(0)
    out = model(ids, positions, labels=ids, return_logits=True)
    alone = model(ids[:, 9:], torch.arange(15).unsqueeze(0), return_logits=True).logits
    torch.testing.assert_close(out.logits[:, 9:], alone, rtol=1e-10, atol=1e-10)
    out.loss_sum.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent


@pytest.mark.parametrize("name", ["mac", "mag"])
def test_titans_decoding_equals_training_forward(name):
    model = tiny_model("TA", TITANS[name])
    ids = torch.randint(0, VOCAB, (2, 13))
    full = model(ids, return_logits=True).logits
    torch.testing.assert_close(_decode_logits(model, ids, 7), full, rtol=1e-10, atol=1e-10)


def test_titans_memory_carries_information_across_mac_segments():
    model = tiny_model("T", TITANS["mac"])
    ids = torch.randint(0, VOCAB, (1, 15))
    base = model(ids, return_logits=True).logits
    changed = ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % VOCAB  # first segment only
    out = model(changed, return_logits=True).logits
    assert not torch.allclose(out[:, 10:], base[:, 10:])  # the third segment sees it through the memory


@pytest.mark.parametrize("option, message", [
    ("{titans: {variant: mat}}", "variant: 'mat' is not one of"),
    ("{titans: {memory_depth: 3}}", "memory_depth"),
    ("{titans: {segment_len: 0}}", "segment_len"),
    ("{landmark: {block_size: 1}}", "block_size"),
    ("{landmark: {retrieve_top_k: -1}}", "retrieve_top_k"),
])
def test_bad_mixer_options_raise_config_errors(option, message):
    with pytest.raises(ConfigError, match=message):
        tiny_model("TM", option)


# ------------------------------------------------------------------------------------------------ recipes
RECIPE_RUNS = {
    "landmark": ["model.mixers={landmark: {block_size: 16}}", "model.vocab_size=513", "model.pattern=MA"],
    "titans_mac": ["model.mixers={titans: {variant: mac, segment_len: 16, chunk_size: 8, persistent_tokens: 2}}",
                   "model.pattern=T"],
    "titans_mag": ["model.mixers={titans: {variant: mag, window: 16, chunk_size: 8, persistent_tokens: 2}}",
                   "model.pattern=T"],
}


@pytest.mark.parametrize("recipe", sorted(RECIPE_RUNS))
def test_tiny_recipe_loss_falls(recipe, cache_dir, tmp_path):
    import subprocess
    import sys

    from tests.train.conftest import ROOT, SMALL, child_env, train_losses

    run_dir = tmp_path / recipe
    args = [f"recipes/{recipe}.yaml", f"run.dir={run_dir}", *SMALL, *RECIPE_RUNS[recipe], "train.steps=10",
            "train.tokens_per_step=0", "model.activation_checkpointing=false", "train.lr=3e-3",
            "checkpoint.interval=0", "data.sources=[{type: stdlib}]"]
    proc = subprocess.run([sys.executable, "-m", "lctrain", *args], cwd=ROOT, env=child_env(cache_dir),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = train_losses(run_dir)
    first = sum(losses[s] for s in (1, 2)) / 2
    last = sum(losses[s] for s in (9, 10)) / 2
    assert last < first - 0.3, losses
