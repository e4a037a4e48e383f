"""The chunked distillation loss equals the whole-sequence formula, value and gradient."""
import pytest
import torch
import torch.nn.functional as F

from lctrain.convert.distill import distill_loss_sum


def _reference(hs, ws, ht, wt, labels, tau, alpha):
    mask = labels != -100
    logp_s = F.log_softmax(hs @ ws.T / tau, -1)
    p_t = F.softmax(ht @ wt.T / tau, -1)
    kl = F.kl_div(logp_s[mask], p_t[mask], reduction="sum")
    ce = F.cross_entropy(hs @ ws.T, labels, ignore_index=-100, reduction="sum")
    return alpha * tau ** 2 * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("chunk", [0, 1, 7, 50, 64])
@pytest.mark.parametrize("tau,alpha", [(1.0, 0.5), (2.0, 1.0), (0.5, 0.0)])
def test_chunks_equal_the_whole(chunk, tau, alpha):
    torch.manual_seed(0)
    n, d, vocab = 50, 16, 37
    hs = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(vocab, d, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(n, d, dtype=torch.float64), torch.randn(vocab, d, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n,))
    labels[::5] = -100
    loss, kl, ce, count = distill_loss_sum(hs, ws, ht, wt, labels, tau, alpha, chunk)
    ref, ref_kl, ref_ce = _reference(hs, ws, ht, wt, labels, tau, alpha)
    assert count == (labels != -100).sum()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), ref_kl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce.double(), ref_ce.detach(), rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(loss, (hs, ws))
    ref_grads = torch.autograd.grad(ref, (hs, ws))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


def test_identical_models_have_zero_kl():
    torch.manual_seed(1)
    h, w = torch.randn(20, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (20,))
    _, kl, _, _ = distill_loss_sum(h, w, h, w, labels, 2.0, 0.5, 6)
    assert abs(float(kl)) < 1e-4


@pytest.mark.parametrize("overrides,message", [
    (["distill.enabled=true"], "distill.teacher: empty and checkpoint.init_from is empty"),
    (["distill.align_steps=5", "checkpoint.init_from=x"], "distill.align_steps: layer alignment needs converted"),
    (["distill.enabled=true", "checkpoint.init_from=x", "train.engine=deepspeed"], "train.engine ddp or fsdp"),
    (["distill.alpha=1.5"], "distill.alpha: 1.5 is not allowed"),
])
def test_bad_distill_settings_are_one_line(overrides, message):
    from lctrain.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)
