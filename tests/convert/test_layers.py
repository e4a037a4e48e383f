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


def _ctx(ids):
    from lctrain.models.context import BatchContext
    return BatchContext.from_positions(torch.arange(ids.shape[1]).expand(ids.shape[0], -1))


def _o_proj_inputs(model, layer, ids):
    seen = {}
    handle = model.layers[layer].mixer.o_proj.register_forward_hook(lambda m, a, o: seen.update(u=a[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen["u"]


def test_calibrated_scales_are_the_per_head_least_squares_fit():
    """After calibration, moving any head's scale up or down moves its output away from the attention's."""
    from lctrain.convert.calibrate import calibrate_output_scales
    teacher = _teacher(n_kv_heads=2)
    student = _student(teacher, "GLSA")
    ids = torch.randint(0, 300, (2, 48))
    scales = calibrate_output_scales(student, teacher, [0, 1, 2], ids, _ctx(ids))
    assert set(scales) == {0, 1, 2}
    torch.testing.assert_close(scales[2], torch.ones(4), rtol=1e-4, atol=1e-4)  # swa == attention on 48 tokens

    def head_errors(layer, delta):
        from lctrain.convert.calibrate import _projection_inputs
        seen = {}
        mixer = teacher.layers[layer].mixer
        h = mixer.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
        target = _o_proj_inputs(teacher, layer, ids)
        h.remove()
        new = student.layers[layer].mixer
        with torch.no_grad():
            u = _projection_inputs(new, lambda: new(seen["x"], _ctx(ids)))
        scale = scales[layer].repeat_interleave(u.shape[-1] // 4)
        err = (u * (scale + delta) - target).reshape(-1, 4, u.shape[-1] // 4)
        return err.pow(2).sum((0, 2))

    for layer in (0, 1):
        best = head_errors(layer, 0.0)
        assert torch.all(head_errors(layer, 0.05) > best) and torch.all(head_errors(layer, -0.05) > best)


@pytest.mark.slow
def test_a_converted_layer_reads_like_the_attention_it_replaced(tmp_path):
    """On a trained teacher's hidden states, converted + calibrated GDN and linear layers correlate with the attention
    outputs they replace; the same layers freshly initialised (and calibrated the same way) do not."""
    import glob
    import subprocess
    import sys
    import sysconfig

    import lctrain
    from lctrain.convert.calibrate import calibrate_output_scales
    from tests.train.conftest import ROOT, child_env

    run = tmp_path / "teacher"
    subprocess.run([sys.executable, "-m", "lctrain", "recipes/convert_teacher.yaml", f"run.dir={run}",
                    "model.d_model=64", "data.seq_len=128", "data.vocab_size=512", "data.max_documents=200",
                    "train.steps=200", "train.eval_interval=0", "logging.progress=none"],
                   cwd=ROOT, env=child_env(tmp_path / "cache"), check=True, capture_output=True, timeout=900)
    wrapped, tokenizer = lctrain.load_model(run)
    teacher = wrapped.lm.eval()
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:40]
    tokens = [t for f in files for t in tokenizer.encode(open(f, errors="replace").read())]
    calib, held_out = (torch.tensor(tokens[i:i + 1024]).view(8, 128) for i in (0, 4096))

    def correlations(pattern: str, fresh: bool) -> list[float]:
        student = _student(teacher, pattern)
        if fresh:
            torch.manual_seed(5)
            other = LanguageModel(student.cfg)
            for i in range(3):
                student.layers[i].mixer.load_state_dict(other.layers[i].mixer.state_dict())
        calibrate_output_scales(student, teacher, [0, 1, 2], calib, _ctx(calib))
        out = []
        for layer in range(3):
            seen = {}
            h = teacher.layers[layer].mixer.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
            with torch.no_grad():
                teacher(held_out)
                h.remove()
                mine = student.layers[layer].mixer(seen["x"], _ctx(held_out))
            a, b = mine.flatten() - mine.mean(), seen["y"].flatten() - seen["y"].mean()
            out.append(float(a @ b / (a.norm() * b.norm())))
        return out

    for pattern in ("GGGA", "LLLA"):
        converted, fresh = correlations(pattern, False), correlations(pattern, True)
        assert sum(converted) / 3 > 0.2 and sum(converted) / 3 > sum(abs(f) for f in fresh) / 3 + 0.15, \
            (pattern, converted, fresh)
