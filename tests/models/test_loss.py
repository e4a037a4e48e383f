"""The fused head + cross-entropy: whole batch at once (auto) and chunked give the loss and gradients of plain
logits + F.cross_entropy."""
import pytest
import torch
import torch.nn.functional as F

from lctrain.models.loss import AUTO_LOGITS_BUDGET_BYTES, chunked_cross_entropy_sum, loss_chunk_size


def _case(n=53, d=12, vocab=37, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, d, generator=gen, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[[0, 5, n - 1]] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_tokens", [0, 1, 8, 53, 1000])
def test_fused_loss_and_gradients_equal_full_logits(chunk_tokens):
    hidden, weight, labels = _case()
    loss, n = chunked_cross_entropy_sum(hidden, weight, labels, chunk_tokens)
    ref = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")
    assert n == 50
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    # a non-unit upstream gradient (the loop scales loss_sum by world / n_targets)
    got = torch.autograd.grad(loss * 0.37, (hidden, weight))
    want = torch.autograd.grad(ref * 0.37, (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_kept_and_chunked_agree_in_fp32_and_without_grad():
    hidden, weight, labels = _case(n=70, d=16, vocab=300, dtype=torch.float32, seed=1)
    whole, _ = chunked_cross_entropy_sum(hidden, weight, labels, 0)
    chunked, _ = chunked_cross_entropy_sum(hidden, weight, labels, 9)
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-4)
    g_whole = torch.autograd.grad(whole, (hidden, weight))
    g_chunk = torch.autograd.grad(chunked, (hidden, weight))
    for a, b in zip(g_whole, g_chunk):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        plain, _ = chunked_cross_entropy_sum(hidden, weight, labels, 9)
    torch.testing.assert_close(plain, whole.detach(), rtol=1e-5, atol=1e-4)


def test_only_weight_needs_grad_and_tied_weight_accumulates():
    hidden, weight, labels = _case()
    frozen = hidden.detach()
    loss, _ = chunked_cross_entropy_sum(frozen, weight, labels, 8)
    (g,) = torch.autograd.grad(loss, weight)
    ref = F.cross_entropy(frozen @ weight.T, labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(g, torch.autograd.grad(ref, weight)[0])
    # the weight also used elsewhere (tied embedding): gradients of both uses add up
    loss, _ = chunked_cross_entropy_sum(hidden, weight, labels, 8)
    ref = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(torch.autograd.grad(loss + (weight ** 2).sum(), weight)[0],
                               torch.autograd.grad(ref + (weight ** 2).sum(), weight)[0])


def test_bf16_autocast_matches_autocast_reference():
    hidden, weight, labels = _case(n=40, d=16, vocab=64, dtype=torch.float32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_cross_entropy_sum(hidden, weight, labels, 16)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100, reduction="sum")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-2)
    got = torch.autograd.grad(loss, (hidden, weight))
    want = torch.autograd.grad(ref, (hidden, weight))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_auto_chunk_size_follows_the_budget():
    assert loss_chunk_size(0, 8192, 4096) == 8192  # 128 MiB of fp32 logits: one chunk
    big_vocab = 128 * 1024
    assert loss_chunk_size(0, 1 << 20, big_vocab) == AUTO_LOGITS_BUDGET_BYTES // (4 * big_vocab)
    assert loss_chunk_size(2048, 100, 4096) == 100 and loss_chunk_size(7, 100, 4096) == 7


def test_large_logits_and_fully_ignored_chunks():
    """Logits far beyond exp's range (the in-place log-sum-exp subtracts the row max first) and a chunk whose labels
    are all ignored: loss and gradients still equal plain cross-entropy."""
    hidden, weight, labels = _case(n=24, d=8, vocab=50, dtype=torch.float32, seed=3)
    with torch.no_grad():
        hidden.mul_(40.0)  # logits of several hundred
    labels[8:16] = -100  # the second chunk of 8 holds no target
    loss, n = chunked_cross_entropy_sum(hidden, weight, labels, 8)
    ref = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")
    assert int(n) == 24 - 8 - 3 and torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-3)
    got = torch.autograd.grad(loss, (hidden, weight))
    want = torch.autograd.grad(ref, (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert float(got[0][8:16].abs().max()) == 0.0
