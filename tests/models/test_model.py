"""The decoder LM: pattern expansion, document isolation, decoding with a cache, chunked loss, init."""
import math

import pytest
import torch
import torch.nn.functional as F

from lctrain.config import ConfigError, load_config
from lctrain.models import BatchContext, LanguageModel, cu_seqlens_from_positions
from lctrain.models.loss import chunked_cross_entropy_sum
from lctrain.models.shortconv import causal_depthwise_conv

VOCAB = 97


def tiny_model(pattern="GLGA", **over) -> LanguageModel:
    overrides = [f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
                 "model.n_layers=4", f"model.pattern={pattern}", "model.ffn_dim=64", "model.loss_chunk_tokens=7",
                 "model.mixers={gdn: {head_k_dim: 8, head_v_dim: 16}}"]
    overrides += [f"model.{k}={v}" for k, v in over.items()]
    torch.manual_seed(0)
    return LanguageModel(load_config(None, overrides).model).double()


def test_pattern_expansion_and_errors():
    assert tiny_model("GGGA").layer_types == ["gdn", "gdn", "gdn", "attn"]
    assert tiny_model("GA").layer_types == ["gdn", "attn", "gdn", "attn"]
    assert tiny_model("[linear, attn]").layer_types == ["linear", "attn", "linear", "attn"]
    with pytest.raises(ConfigError, match="unknown layer letter"):
        tiny_model("GXA")
    with pytest.raises(ConfigError, match="does not divide"):
        tiny_model("GGA")


@pytest.mark.parametrize("pattern", ["A", "G", "L", "GLGA"])
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
    # each document alone gives the same logits as inside the pack
    alone = model(ids[:, 10:], torch.arange(20).expand(2, 20), return_logits=True).logits
    assert torch.allclose(alone, base[:, 10:], atol=1e-10)


@pytest.mark.parametrize("pattern", ["A", "G", "L", "GLGA"])
def test_prefill_then_decode_equals_full_forward(pattern):
    model = tiny_model(pattern)
    ids = torch.randint(0, VOCAB, (2, 19))
    full = model(ids, return_logits=True).logits
    cache = {}
    prefix = 11
    pieces = [model(ids[:, :prefix], ctx=BatchContext(torch.arange(prefix).expand(2, prefix), cache=cache),
                    return_logits=True).logits]
    for t in range(prefix, ids.shape[1]):
        ctx = BatchContext(torch.full((2, 1), t), cache=cache)
        pieces.append(model(ids[:, t:t + 1], ctx=ctx, return_logits=True).logits)
    # the recurrent state is kept in fp32 by contract, so agreement is to fp32 precision
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_chunked_loss_equals_full_cross_entropy():
    hidden = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, VOCAB, (50,))
    labels[[0, 7, 31]] = -100
    loss, n = chunked_cross_entropy_sum(hidden, weight, labels, chunk_tokens=8)
    ref = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")
    assert n == 47 and torch.allclose(loss.double(), ref, rtol=1e-6)
    g1 = torch.autograd.grad(loss, (hidden, weight))
    g2 = torch.autograd.grad(ref, (hidden, weight))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g1, g2))


def test_loss_matches_logits_and_counts_targets():
    model = tiny_model("GA")
    ids = torch.randint(0, VOCAB, (2, 16))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    out = model(ids, labels=labels, return_logits=True)
    ref = F.cross_entropy(out.logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="sum")
    assert out.n_targets == 30 and torch.allclose(out.loss_sum.double(), ref, rtol=1e-6)


def test_short_conv_resets_at_documents():
    x = torch.randn(1, 10, 3, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]])
    out = causal_depthwise_conv(x, w, pos)
    starts = [0, 3, 8, 10]
    for a, b in zip(starts, starts[1:]):
        seg = x[:, a:b].transpose(1, 2)
        ref = F.conv1d(F.pad(seg, (3, 0)), w[:, None, :], groups=3).transpose(1, 2)
        assert torch.allclose(out[:, a:b], ref, atol=1e-12)


def test_cu_seqlens_from_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])
    assert cu_seqlens_from_positions(pos).tolist() == [0, 3, 5, 7, 10]


def test_init_scales_residual_outputs_and_gdn_decay():
    model = tiny_model("GA", init_std=0.02)
    out_std = model.layers[1].mixer.o_proj.weight.std().item()
    in_std = model.layers[1].mixer.q_proj.weight.std().item()
    assert out_std == pytest.approx(0.02 / math.sqrt(8), rel=0.3) and in_std == pytest.approx(0.02, rel=0.3)
    gdn = model.layers[0].mixer
    a = gdn.A_log.exp()
    assert ((a >= 1) & (a <= 16)).all() and gdn.A_log._no_weight_decay
    dt = F.softplus(gdn.dt_bias)
    assert ((dt >= 1e-3 - 1e-9) & (dt <= 0.1 + 1e-9)).all()
