"""Compatibility matrix of the hybrid Hugging Face export: every feature transformers users rely on, per layer
type (A G L S B C M T), each checked against lctrain's own model. The default run uses one model holding every
layer type (one fast cell per feature); the single-type cells are marked slow."""
import pytest
import torch

from lctrain.export import names
from lctrain.export.hf_export import export_model
from tests.export.conftest import lctrain_logits, tiny_model
from tests.export.test_hf_export import greedy

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, Cache  # noqa: E402

TRAINED = 16  # the training context length the export is told; prompts go to 4x that
MIXERS = {"attn": {"rope_scaling": 4.0}, "swa": {"window": 5, "sink": 2}, "conv": {"kernel_size": 4, "expand": 2},
          "based": {"feature_dim": 8}, "landmark": {"block_size": 6},
          "titans": {"variant": "mac", "segment_len": 8, "chunk_size": 3, "persistent_tokens": 2, "window": 5}}
ALL = "AGLSBCMT"
CELLS = [ALL] + [pytest.param(t, marks=pytest.mark.slow) for t in ALL]
INIT_STD = 0.1  # every mixer visibly moves the logits, so greedy paths differ between prompts


@pytest.fixture(scope="module")
def exports(tokenizer, tmp_path_factory):
    """pattern -> (lctrain model, export directory), built once per module."""
    built = {}

    def get(pattern):
        if pattern not in built:
            # One extra id, the last: the landmark token of models with landmark layers.
            model = tiny_model(tokenizer.vocab_size + 1, pattern, n_kv_heads=2, mixers=MIXERS, init_std=INIT_STD)
            out = export_model(model, tokenizer, tmp_path_factory.mktemp(f"export_{pattern}"), max_positions=TRAINED,
                               remote_code=True)
            built[pattern] = model, out
        return built[pattern]
    return get


def load(out, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **kwargs).eval()


def random_ids(tokenizer, *shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, tokenizer.vocab_size, shape, generator=generator)  # no pad/bos/eos ids


def left_pad(prompts, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    return ids, mask


def generation_lengths(hf):
    """Record the input length of every forward call (a list filled while the hook is on)."""
    lengths = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        lengths.append(ids.shape[1])
    return lengths, hf.register_forward_pre_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("pattern", CELLS)
def test_padded_batches_equal_each_row_alone(tokenizer, exports, pattern):
    model, out = exports(pattern)
    hf = load(out)
    ids = random_ids(tokenizer, 3, 20)
    lengths = [20, 13, 6]
    for side in ("left", "right"):
        batch = torch.full((3, 20), tokenizer.pad_id)
        mask = torch.zeros(3, 20, dtype=torch.long)
        for row, n in enumerate(lengths):
            span = slice(20 - n, 20) if side == "left" else slice(0, n)
            batch[row, span], mask[row, span] = ids[row, :n], 1
        with torch.no_grad():
            logits = hf(batch, attention_mask=mask).logits
        for row, n in enumerate(lengths):
            span = slice(20 - n, 20) if side == "left" else slice(0, n)
            torch.testing.assert_close(logits[row, span], lctrain_logits(model, ids[row:row + 1, :n])[0], rtol=0,
                                       atol=1e-4, msg=f"{side} padding, row {row}")

    # Padding in the middle of a row (e.g. packed chat turns): the row computes what its real tokens do alone.
    holes = torch.ones(3, 20, dtype=torch.bool)
    holes[0, [3, 4, 11]] = False
    holes[1, [0, 9]] = False
    batch = torch.where(holes, ids, torch.full_like(ids, tokenizer.pad_id))
    with torch.no_grad():
        logits = hf(batch, attention_mask=holes.long()).logits
    for row in range(3):
        expected = lctrain_logits(model, ids[row:row + 1][:, holes[row]])[0]
        torch.testing.assert_close(logits[row, holes[row]], expected, rtol=0, atol=1e-4, msg=f"holes, row {row}")

    prompts = [ids[0, :9], ids[1, :5], ids[2, :2]]
    batch, mask = left_pad(prompts, tokenizer.pad_id)
    generated = hf.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = greedy(model, prompt[None], 5)[0, len(prompt):]
        assert torch.equal(generated[row, batch.shape[1]:], alone), f"row {row}"


# ---------------------------------------------------------------------------------------------- cache
@pytest.mark.parametrize("pattern", CELLS)
def test_generate_feeds_one_token_per_step_and_the_cache_is_exact(tokenizer, exports, pattern):
    model, out = exports(pattern)
    hf = load(out)
    ids = random_ids(tokenizer, 2, 22, seed=1)
    prompt = ids[:, :8]
    lengths, hook = generation_lengths(hf)
    generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    hook.remove()
    assert lengths == [8, 1, 1, 1, 1]
    assert torch.equal(generated, greedy(model, prompt, 5))

    # Driven by hand: the transformers 5 name `cache`, then the older `past_key_values`; both the same object.
    reference = lctrain_logits(model, ids)
    with torch.no_grad():
        step = hf(ids[:, :7], use_cache=True)
        cache = step.cache
        assert isinstance(cache, Cache) and cache.get_seq_length() == 7
        pieces = [step.logits]
        for t in range(7, ids.shape[1]):
            kwargs = {"cache": cache} if t % 2 else {"past_key_values": cache}
            step = hf(ids[:, t:t + 1], use_cache=True, **kwargs)
            assert step.cache is cache
            pieces.append(step.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("pattern", CELLS)
def test_beam_search_reorders_every_state(tokenizer, exports, pattern):
    _, out = exports(pattern)
    hf = load(out)
    ids = random_ids(tokenizer, 2, 9, seed=2)
    batch, mask = left_pad([ids[0], ids[1, :5]], tokenizer.pad_id)
    options = dict(attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, output_scores=True,
                   return_dict_in_generate=True)
    cached = hf.generate(batch, **options)
    recomputed = hf.generate(batch, use_cache=False, **options)  # the full prefix every step: no state to reorder
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------- training
def enable_checkpointing(hf):
    """transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)."""
    enable = getattr(hf, "activation_checkpointing_enable", None)
    if enable is not None:
        enable()
    else:
        hf.gradient_checkpointing_enable()


def lctrain_gradients(model, ids):
    model.zero_grad()
    model.train()
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # lctrain takes shifted targets
    out = model(ids, labels=labels)
    loss = out.loss_sum / out.n_targets
    loss.backward()
    model.eval()
    return loss.detach(), {names.to_hf(n): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("pattern", CELLS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_forward_gradients_equal_lctrain(tokenizer, exports, pattern, checkpointing):
    model, out = exports(pattern)
    hf = load(out)
    hf.train()
    if checkpointing:
        enable_checkpointing(hf)
        assert hf.model.gradient_checkpointing
    ids = random_ids(tokenizer, 2, 18, seed=3)
    result = hf(ids, labels=ids)
    assert result.cache is None  # no cache is built in training mode
    result.loss.backward()
    loss, grads = lctrain_gradients(model, ids)
    torch.testing.assert_close(result.loss.detach(), loss, rtol=1e-5, atol=1e-5)
    theirs = dict(hf.named_parameters())
    for name, grad in grads.items():
        assert theirs[name].grad is not None, name
        torch.testing.assert_close(theirs[name].grad, grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("pattern", CELLS)
def test_hidden_states_and_tuple_outputs(tokenizer, exports, pattern):
    model, out = exports(pattern)
    hf = load(out)
    ids = random_ids(tokenizer, 2, 14, seed=4)
    layer_outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: layer_outputs.append(o)) for layer in model.layers]
    with torch.no_grad():
        hidden = model(ids).hidden
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        result = hf(ids, output_hidden_states=True)
        assert len(result.hidden_states) == len(pattern) + 1
        torch.testing.assert_close(result.hidden_states[0], model.embed(ids), rtol=0, atol=1e-6)
        for got, expected in zip(result.hidden_states[1:-1], layer_outputs[:-1]):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(result.hidden_states[-1], hidden, rtol=0, atol=1e-4)  # after the final norm
        as_tuple = hf(ids, labels=ids, return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[1], result.logits, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(as_tuple[0], hf(ids, labels=ids).loss, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("pattern", CELLS)
def test_bfloat16_load(tokenizer, exports, pattern):
    model, out = exports(pattern)
    hf = load(out, dtype=torch.bfloat16)
    assert hf.dtype == torch.bfloat16
    ids = random_ids(tokenizer, 2, 16, seed=5)
    with torch.no_grad():
        logits = hf(ids).logits.float()
    reference = lctrain_logits(model, ids)
    assert torch.isfinite(logits).all()
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max() + 0.05
    batch, mask = left_pad([ids[0, :8], ids[1, :5]], tokenizer.pad_id)
    generated = hf.generate(batch, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 11)


@pytest.mark.parametrize("pattern", CELLS)
def test_save_pretrained_round_trip(tokenizer, exports, pattern, tmp_path):
    model, out = exports(pattern)
    load(out).save_pretrained(tmp_path / "saved")
    AutoTokenizer.from_pretrained(out, trust_remote_code=True).save_pretrained(tmp_path / "saved")
    again = load(tmp_path / "saved")
    ids = random_ids(tokenizer, 2, 12, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, lctrain_logits(model, ids), rtol=0, atol=1e-4)
    assert type(AutoTokenizer.from_pretrained(tmp_path / "saved", trust_remote_code=True)).__name__ == \
        "LctrainTokenizer"


@pytest.mark.parametrize("pattern", CELLS)
def test_prompt_four_times_the_training_length(tokenizer, exports, pattern):
    model, out = exports(pattern)
    hf = load(out)
    limits = hf.config.context_limits
    assert hf.config.trained_length == TRAINED
    assert limits.get("attn", 4 * TRAINED) == 4 * TRAINED and limits.get("landmark", TRAINED) == TRAINED
    bounded = [n for n in limits.values() if n is not None]
    assert hf.config.max_position_embeddings == (min(bounded) if bounded else None)
    hf_tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert hf_tokenizer.model_max_length == (min(bounded) if bounded else hf_tokenizer.model_max_length)
    if not bounded:
        assert hf_tokenizer.model_max_length > 10 ** 9  # transformers' "no limit"

    ids = random_ids(tokenizer, 1, 4 * TRAINED, seed=7)
    with torch.no_grad():
        prefill = hf(ids[:, :-4], use_cache=True)
        steps = [prefill.logits]
        for t in range(ids.shape[1] - 4, ids.shape[1]):
            steps.append(hf(ids[:, t:t + 1], cache=prefill.cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), lctrain_logits(model, ids), rtol=0, atol=1e-4)


def test_tokenizer_flags_are_what_it_does(tokenizer, exports):
    _, out = exports(ALL)
    hf_tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ids = hf_tokenizer("def f(x): return x").input_ids
    assert hf_tokenizer.add_bos_token and ids[0] == tokenizer.bos_id
    assert not hf_tokenizer.add_eos_token and ids[-1] != tokenizer.eos_id


def test_unsupported_requests_are_refused_or_reported(tokenizer, exports):
    _, out = exports(ALL)
    hf = load(out)
    ids = random_ids(tokenizer, 1, 6, seed=8)
    with torch.no_grad():
        assert hf(ids, output_attentions=True).attentions is None  # no attention matrix exists; logged once
        with pytest.raises(ValueError, match="attention_mask must be 2-D"):
            hf(ids, attention_mask=torch.ones(1, 1, 6, 6))
        with pytest.raises(ValueError, match="cache must be an LctrainCache"):
            hf(ids, cache=transformers.DynamicCache())
        cache = hf(ids).cache
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(1)
