"""H2O KV-cache eviction: with room for everything it is exact decoding; with a budget the cache stays bounded and
keeps the recent entries plus the heaviest hitters."""
import pytest
import torch

from lctrain.config import ModelConfig
from lctrain.eval.generate import generate
from lctrain.models.h2o import h2o_attend, set_kv_budget
from lctrain.models import LanguageModel
from lctrain.models.context import BatchContext


def _model(kv_heads=2) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=kv_heads,
                                     ffn_dim=64, pattern="AGA")).double().eval()


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_a_budget_that_holds_everything_is_exact(kv_heads):
    lm = _model(kv_heads)
    prompt = torch.randint(0, 50, (2, 17))
    full = generate(lm, prompt, 12)
    set_kv_budget(lm, 64, 8)
    assert torch.equal(generate(lm, prompt, 12), full)
    # logits too: prefill + one decode step through the H2O path equal the plain forward
    cache = {}
    pos = torch.arange(17).expand(2, 17)
    with torch.no_grad():
        lm(prompt, ctx=BatchContext(pos, cache=cache), return_logits=True)
        step = lm(full[:, :1], ctx=BatchContext(torch.full((2, 1), 17), cache=cache), return_logits=True).logits
        ref = lm(torch.cat([prompt, full[:, :1]], 1), return_logits=True).logits[:, -1:]
    torch.testing.assert_close(step, ref, rtol=1e-10, atol=1e-10)


def test_a_small_budget_bounds_the_cache():
    lm = _model()
    set_kv_budget(lm, 8, 3)
    cache = {}
    prompt = torch.randint(0, 50, (1, 30))
    with torch.no_grad():
        lm(prompt, ctx=BatchContext(torch.arange(30)[None], cache=cache), return_logits=True)
        for i in range(5):
            lm(torch.tensor([[7]]), ctx=BatchContext(torch.tensor([[30 + i]]), cache=cache), return_logits=True)
    for layer in (0, 2):
        entry = cache[layer]
        assert entry["k"].shape[2] == 8 and entry["seen"] == 35
        newest = entry["pos"].sort(dim=-1).values[..., -3:]
        assert torch.equal(newest, torch.tensor([32, 33, 34]).expand_as(newest))  # the recent window is kept


def test_heavy_hitters_survive_eviction():
    dim = 4
    k = torch.zeros(1, 6, 1, dim)
    k[0, 2, 0, 0] = 10.0  # every query aligned with e0 attends key 2 almost exclusively
    q = torch.zeros(1, 6, 1, dim)
    q[0, :, 0, 0] = 1.0
    v = torch.randn(1, 6, 1, dim)
    entry = {}
    h2o_attend(q, k, v, entry, budget=3, recent=2, scale=1.0)
    assert sorted(entry["pos"][0, 0].tolist()) == [2, 4, 5]  # the heavy hitter and the two newest
    # a later query sees exactly the kept entries
    q_new, k_new = q[:, :1], torch.zeros(1, 1, 1, dim)
    out = h2o_attend(q_new, k_new, v[:, :1], entry, budget=3, recent=2, scale=1.0)
    assert entry["k"].shape[2] == 3 and out.shape == (1, 1, 1, dim)


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="budget"):
        set_kv_budget(_model(), 1)
    with pytest.raises(ValueError, match="recent"):
        set_kv_budget(_model(), 8, 8)
