"""Which layers convert, and how a new layer starts from the attention weights it replaces."""
import math

import pytest
import torch

from lctrain.config import ConfigError, ConvertConfig, ModelConfig
from lctrain.convert.layers import convert_model_config, init_from_attention, target_layer_types
from lctrain.models import LanguageModel


def test_default_keeps_every_fourth_attention_layer():
    assert target_layer_types(["attn"] * 8, ConvertConfig()) == ["gdn", "gdn", "gdn", "attn"] * 2
    assert target_layer_types(["attn"] * 6, ConvertConfig(keep_every=3, into="L")) == \
        ["linear", "linear", "attn"] * 2
    assert target_layer_types(["attn"] * 4, ConvertConfig(pattern="GSLA")) == ["gdn", "swa", "linear", "attn"]


@pytest.mark.parametrize("pattern,message", [
    ("CCCA", "layer 0 would turn 'attn' into 'conv'"),
    ("A", "changes no layer"),
    ("GGX", "unknown layer letter"),
])
def test_impossible_conversions_are_one_line_errors(pattern, message):
    cfg = ModelConfig(n_layers=4, pattern="A")
    with pytest.raises(ConfigError, match=message) as info:
        convert_model_config(cfg, ConvertConfig(pattern=pattern))
    assert "\n" not in str(info.value)


def _teacher(n_kv_heads: int = 0) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=300, d_model=64, n_layers=4, n_heads=4, n_kv_heads=n_kv_heads,
                                     ffn_dim=96, pattern="A")).eval()


def _student(teacher: LanguageModel, pattern: str) -> LanguageModel:
    cfg = ModelConfig(**{**teacher.cfg.__dict__})
    convert_model_config(cfg, ConvertConfig(pattern=pattern))
    torch.manual_seed(1)
    student = LanguageModel(cfg).eval()
    init_from_attention(student, teacher)
    return student


def test_shared_weights_are_copied_and_gqa_keys_expanded():
    teacher = _teacher(n_kv_heads=2)
    student = _student(teacher, "GLSA")
    assert student.layer_types == ["gdn", "linear", "swa", "attn"]
    assert student._converted_layers == [0, 1, 2]
    t, s = teacher.state_dict(), student.state_dict()
    for name in t:
        if not name.startswith(("layers.0.mixer", "layers.1.mixer", "layers.2.mixer")):
            assert torch.equal(t[name], s[name]), name
    k = t["layers.0.mixer.k_proj.weight"].view(2, 16, 64)  # 2 kv heads of 16
    expanded = s["layers.0.mixer.k_proj.weight"].view(4, 16, 64)
    for head in range(4):  # query head h reads kv head h // 2
        assert torch.equal(expanded[head], k[head // 2])
    assert torch.equal(s["layers.1.mixer.v_proj.weight"].view(4, 16, 64)[3], t["layers.1.mixer.v_proj.weight"].view(2, 16, 64)[1])
    assert torch.equal(s["layers.2.mixer.k_proj.weight"], t["layers.2.mixer.k_proj.weight"])  # swa keeps GQA
    conv = student.layers[0].mixer.q_conv.weight
    assert torch.equal(conv[:, -1], torch.ones_like(conv[:, -1])) and not conv[:, :-1].any()


def test_new_gdn_layers_start_as_slow_additive_readers():
    """Identity convolutions, beta = 1/2 and data-independent decays between 0.9 and 0.999 per token."""
    import torch.nn.functional as F
    student = _student(_teacher(), "GGGA")
    mixer = student.layers[0].mixer
    x = torch.randn(2, 5, 64)
    assert not mixer.a_proj(x).any() and torch.all(torch.sigmoid(mixer.b_proj(x)) == 0.5)
    decay = torch.exp(-mixer.A_log.exp() * F.softplus(mixer.dt_bias))
    torch.testing.assert_close(decay, torch.exp(torch.linspace(math.log(0.9), math.log(0.999), 4)))
