"""MoA profiling and plans on a model: the influence estimate against finite differences, rule losses, and plans
applied through local_attention (training path and cached decoding)."""
import pytest
import torch

from lctrain.config import ModelConfig
from lctrain.eval.generate import generate
from lctrain.models import LanguageModel
from lctrain.moa.apply import set_attn_plan
from lctrain.moa.plan import dense_plan, save_plan, uniform_plan
from lctrain.moa.profile import influence, layer_influences, profile, response_loss
from lctrain.moa.rules import Rule


def _model(pattern="AGA", heads=4) -> LanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=len(pattern), n_heads=heads, ffn_dim=64, pattern=pattern,
                      init_std=0.2)  # larger weights: peaked attention, so entries differ in influence
    return LanguageModel(cfg).double().eval()


def _masking_probe(layer, head, i, j, eps):
    """Moves A towards 'entry (i, j) masked' by eps (eps = 1: masked exactly, the row renormalised)."""
    def probe(at_layer, probs):
        if at_layer != layer:
            return probs
        a = probs[0, head, i, j]
        direction = torch.zeros_like(probs)
        direction[0, head, i] = probs[0, head, i] * a / (1 - a)
        direction[0, head, i, j] = -a
        return probs + eps * direction
    return probe


def test_influence_is_the_derivative_of_masking_one_entry():
    lm = _model("AA")  # attention and MLPs compute in float64 throughout: finite differences are clean
    tokens = torch.randint(0, 61, (24,))
    response = 6
    influences, dense = layer_influences(lm, tokens, response)
    assert set(influences) == {0, 1}
    with torch.no_grad():
        assert abs(float(response_loss(lm, tokens, response)) - dense) < 1e-12
        checked = 0
        for layer, head, i, j in [(0, 1, 20, 3), (1, 0, 22, 21), (1, 3, 21, 0), (0, 2, 19, 10)]:
            eps = 1e-5
            up = float(response_loss(lm, tokens, response, _masking_probe(layer, head, i, j, eps)))
            down = float(response_loss(lm, tokens, response, _masking_probe(layer, head, i, j, -eps)))
            numeric = (up - down) / (2 * eps)
            assert numeric == pytest.approx(float(influences[layer][head, i, j]), rel=1e-5, abs=1e-10)
            assert abs(numeric) > 1e-6  # an entry that matters (query 23's output is never scored)
            checked += 1
    assert checked == 4


def test_influence_predicts_the_loss_change_of_actually_masking_small_entries():
    lm = _model()
    tokens = torch.randint(0, 61, (24,))
    influences, dense = layer_influences(lm, tokens, 6)
    e = influences[2]
    # The entries with the largest estimated effect among the small probabilities (first order is accurate there).
    with torch.no_grad():
        probs = {}
        response_loss(lm, tokens, 6, lambda layer, p: probs.setdefault(layer, p) if layer == 2 else p)
        a = probs[2][0]
    candidates = [(h, i, j) for h in range(4) for i in range(18, 24) for j in range(i) if a[h, i, j] < 0.05]
    candidates.sort(key=lambda c: -abs(float(e[c])))
    predicted, actual = [], []
    with torch.no_grad():
        for h, i, j in candidates[:8]:
            masked = float(response_loss(lm, tokens, 6, _masking_probe(2, h, i, j, 1.0)))
            predicted.append(float(e[h, i, j]))
            actual.append(masked - dense)
    predicted, actual = torch.tensor(predicted), torch.tensor(actual)
    assert (predicted - actual).abs().sum() <= 0.1 * actual.abs().sum()
    assert bool((torch.sign(predicted) == torch.sign(actual)).all())


def test_influence_is_zero_where_a_query_sees_only_itself():
    probs = torch.tensor([[1.0, 0.0], [0.3, 0.7]], dtype=torch.float64)
    grad = torch.tensor([[2.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    e = influence(probs, grad)
    assert torch.isfinite(e).all() and e[0, 0] == 0
    # row 1: S = 0.3 - 0.7 = -0.4; E_10 = 0.3/0.7 * (-0.4 - 1) = -0.6; E_11 = 0.7/0.3 * (-0.4 + 1) = 1.4
    torch.testing.assert_close(e[1], torch.tensor([-0.6, 1.4], dtype=torch.float64))


def test_profile_rule_losses():
    lm = _model().float()
    stream = torch.randint(0, 61, (400,))
    rules = [Rule(0.0, 1.0), Rule(4.0, 0.0), Rule(8.0, 0.25)]
    result = profile(lm, stream, [32, 48], rules, sink=2, docs=2, response=4, progress=False)
    assert result["layers"] == [0, 2] and tuple(result["loss"].shape) == (2, 4, 3, 2)
    assert torch.all(result["loss"][:, :, 0] == 0)  # the dense rule drops nothing
    assert torch.all(result["density"][0] == 1) and torch.all(result["density"][1] < result["density"][2])
    assert torch.all(result["loss"][:, :, 1] != 0)
    assert torch.isfinite(result["loss"]).all()


def test_a_dense_plan_reproduces_the_dense_model(tmp_path):
    lm = _model()
    ids = torch.randint(0, 61, (2, 40))
    with torch.no_grad():
        dense = lm(ids, return_logits=True).logits
        plan = save_plan(dense_plan([0, 2], n_heads=4, sink=8), tmp_path / "dense.json")
        set_attn_plan(lm, str(plan))
        assert lm.layers[0].mixer.plan is not None
        torch.testing.assert_close(lm(ids, return_logits=True).logits, dense, rtol=1e-10, atol=1e-10)
        set_attn_plan(lm, None)
        assert lm.layers[0].mixer.plan is None


def test_a_sparse_plan_masks_training_and_decoding_alike(tmp_path):
    lm = _model()
    ids = torch.randint(0, 61, (1, 30))
    with torch.no_grad():
        dense = lm(ids, return_logits=True).logits
        plan = uniform_plan(Rule(3.0, 0.0), [0, 2], n_heads=4, sink=2)
        plan["layers"]["2"][1] = [0.0, 1.0]  # one dense head in layer 2
        set_attn_plan(lm, str(save_plan(plan, tmp_path / "plan.json")))
        sparse = lm(ids, return_logits=True).logits
        assert (sparse - dense).abs().max() > 1e-3  # the plan changes the model ...
        torch.testing.assert_close(sparse[:, :4], dense[:, :4], rtol=1e-10, atol=1e-10)  # ... not within the span
        # Cached decoding applies the same spans: greedy continuation from the full forward == generate().
        prompt = ids[:, :20]
        new = generate(lm, prompt, 5)
        seq = prompt
        for step in range(5):
            nxt = lm(seq, return_logits=True).logits[:, -1].argmax(-1, keepdim=True)
            assert int(nxt) == int(new[0, step])
            seq = torch.cat([seq, nxt], dim=1)


def test_a_plan_for_a_non_attention_layer_is_refused(tmp_path):
    from lctrain.config import ConfigError
    lm = _model()
    path = save_plan(uniform_plan(Rule(3.0, 0.0), [1], n_heads=4, sink=2), tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="not attention layers"):
        set_attn_plan(lm, str(path))
