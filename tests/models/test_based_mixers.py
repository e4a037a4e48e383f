"""The BASED mixers (`swa` S, `based` B, `conv` C): document isolation, prefill + decode = forward, options,
and the BASED recipe training on CPU."""
import sys

import pytest
import torch

from lctrain.config import ConfigError, load_config
from lctrain.models import BatchContext, LanguageModel

VOCAB = 97
# Small spans so that a 30-token test exercises the rolling window, the sink and multi-chunk recurrences.
MIXERS = "{swa: {window: 5, sink: 2}, based: {feature_dim: 4}, conv: {kernel_size: 6}}"


def tiny_model(pattern="CBCS", mixers=MIXERS, **over) -> LanguageModel:
    overrides = [f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
                 "model.n_layers=4", f"model.pattern={pattern}", "model.ffn_dim=64", f"model.mixers={mixers}"]
    overrides += [f"model.{k}={v}" for k, v in over.items()]
    torch.manual_seed(0)
    return LanguageModel(load_config(None, overrides).model).double()


@pytest.mark.parametrize("pattern", ["S", "B", "C", "CBCS"])
def test_documents_do_not_see_each_other(pattern):
    model = tiny_model(pattern)
    ids = torch.randint(0, VOCAB, (2, 30))
    pos = torch.cat([torch.arange(9), torch.arange(1), torch.arange(20)]).expand(2, 30)
    base = model(ids, pos, return_logits=True).logits
    changed = ids.clone()
    changed[:, :10] = (changed[:, :10] + 5) % VOCAB  # edit the first two documents only
    out = model(changed, pos, return_logits=True).logits
    assert torch.allclose(out[:, 10:], base[:, 10:], atol=1e-12)
    assert not torch.allclose(out[:, :9], base[:, :9])
    alone = model(ids[:, 10:], torch.arange(20).expand(2, 20), return_logits=True).logits
    assert torch.allclose(alone, base[:, 10:], atol=1e-10)


@pytest.mark.parametrize("pattern", ["S", "B", "C", "CBCS"])
def test_prefill_then_decode_equals_full_forward(pattern):
    model = tiny_model(pattern)
    ids = torch.randint(0, VOCAB, (2, 23))
    full = model(ids, return_logits=True).logits
    cache = {}
    prefix = 9
    pieces = [model(ids[:, :prefix], ctx=BatchContext(torch.arange(prefix).expand(2, prefix), cache=cache),
                    return_logits=True).logits]
    # one token at a time, then a 3-token chunk, so both decode shapes roll the window cache
    steps = [(t, t + 1) for t in range(prefix, 20)] + [(20, 23)]
    for start, end in steps:
        ctx = BatchContext(torch.arange(start, end).expand(2, end - start), cache=cache)
        pieces.append(model(ids[:, start:end], ctx=ctx, return_logits=True).logits)
    # the Taylor state is kept in fp32 by contract, so agreement is to fp32 precision
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    if "S" in pattern:
        layer = next(i for i, t in enumerate(model.layer_types) if t == "swa")
        assert cache[layer]["recent_k"].shape[1] == 4 and cache[layer]["sink_k"].shape[1] == 2  # bounded cache


def test_sliding_window_wider_than_the_sequence_is_full_attention():
    window = tiny_model("S", mixers="{swa: {window: 1000}}")
    full = tiny_model("A")
    full.load_state_dict(window.state_dict())  # same projections, same parameter names
    ids = torch.randint(0, VOCAB, (2, 21))
    pos = torch.cat([torch.arange(8), torch.arange(13)]).expand(2, 21)
    assert torch.allclose(window(ids, pos, return_logits=True).logits, full(ids, pos, return_logits=True).logits,
                          atol=1e-10)


@pytest.mark.parametrize("mixers, message", [
    ("{swa: {window: 0}}", "model.mixers.swa.window"),
    ("{swa: {sink: -1}}", "model.mixers.swa.sink"),
    ("{based: {feature_dim: 40}}", "model.mixers.based.feature_dim"),
    ("{conv: {kernel_size: 0}}", "model.mixers.conv.kernel_size"),
    ("{conv: {kernels: 4}}", "did you mean 'kernel_size'"),
])
def test_bad_options_raise_config_errors(mixers, message):
    with pytest.raises(ConfigError, match=message):
        tiny_model("CBCS", mixers=mixers)


def test_based_recipe_mix_and_size():
    cfg = load_config("recipes/based.yaml", ["model.vocab_size=32000"])
    with torch.device("meta"):
        model = LanguageModel(cfg.model)
    kinds = model.layer_types
    assert kinds.count("based") / len(kinds) == pytest.approx(0.2)
    assert kinds.count("swa") / len(kinds) == pytest.approx(0.2)
    assert kinds.count("conv") / len(kinds) == pytest.approx(0.6)
    assert 330e6 < model.num_parameters() < 400e6


def test_tiny_based_recipe_trains_on_cpu(cache_dir, tmp_path):
    from tests.train.conftest import ROOT, child_env, read_metrics
    import subprocess

    run = tmp_path / "run"
    overrides = [
        f"run.dir={run}", "model.d_model=64", "model.n_layers=5", "model.n_heads=2", "model.n_kv_heads=1",
        "model.ffn_dim=128", "model.pattern=CBCSC",
        "model.mixers={based: {feature_dim: 8}, swa: {window: 16}, conv: {kernel_size: 8}}",
        "data.sources=[{type: stdlib}]", "data.seq_len=64", "data.vocab_size=512",
        "data.tokenizer_sample_chars=150000", "data.max_documents=40", "train.tokens_per_step=0",
        "train.micro_batch_size=4", "train.steps=30", "train.lr=5e-3", "train.warmup_steps=2",
        "train.log_interval=1", "train.eval_interval=0", "train.eval_batches=2", "checkpoint.interval=0",
        "model.activation_checkpointing=false", "logging.progress=plain",
    ]
    proc = subprocess.run([sys.executable, "-m", "lctrain", "recipes/based.yaml", *overrides], cwd=ROOT,
                          env=child_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
